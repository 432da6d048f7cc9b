// Commands: send a command to a device (optionally waiting for its final
// state), follow each command's state as it changes, cancel one.

import { call } from './api.js';
import { h, fill, field, time, say, errText, parseDuration, fmtDuration } from './ui.js';

const FINAL = new Set(['COMMAND_STATE_SUCCEEDED', 'COMMAND_STATE_FAILED', 'COMMAND_STATE_REJECTED', 'COMMAND_STATE_EXPIRED', 'COMMAND_STATE_CANCELED']);
const POLL_MS = 1000;

function stateName(s) {
  return String(s || 'COMMAND_STATE_UNSPECIFIED').replace('COMMAND_STATE_', '').toLowerCase();
}

export function render(main, { arg }, { signal, session }) {
  const device = h('input', { id: 'cmd-device', type: 'text', required: true, value: arg || '', autocomplete: 'off', list: 'cmd-devices' });
  const devices = h('datalist', { id: 'cmd-devices' });
  const tbody = h('tbody');
  const note = h('p', { class: 'hint', 'aria-live': 'polite' });
  let commands = [];
  let timer = 0;

  main.append(
    h('h1', {}, 'Commands'),
    h('form', { class: 'row-form', onsubmit: (ev) => {
      ev.preventDefault();
      location.hash = '#/commands/' + encodeURIComponent(device.value.trim());
    } }, field('Device (twin id)', device), devices, h('button', { type: 'submit' }, 'Show')),
    arg && session.can('command') ? sendForm() : null,
    arg ? h('section', { 'aria-labelledby': 'cmd-list-title' },
      h('h2', { id: 'cmd-list-title' }, 'Commands of ', h('a', { href: '#/twin/' + encodeURIComponent(arg) }, arg)),
      note,
      h('div', { class: 'table-wrap' }, h('table', { id: 'commands' },
        h('thead', {}, h('tr', {}, ['Name', 'State', 'Params', 'Result', 'Source', 'Queued', 'Changed', ''].map((c) => h('th', { scope: 'col' }, c)))),
        tbody))) : h('p', { class: 'muted' }, 'Choose a device to see and send its commands.'),
  );

  // Ids for the datalist, to pick a device by keyboard.
  call('twin.v1.TwinService/ListTwins', { page_size: 200 }, { signal })
    .then((r) => fill(devices, (r.twins || []).map((t) => h('option', { value: t.id }))))
    .catch(() => {});

  function row(c) {
    const st = stateName(c.state);
    return h('tr', { 'data-id': c.id },
      h('th', { scope: 'row' }, c.name, h('div', { class: 'muted small' }, c.id)),
      h('td', {}, h('span', { class: 'badge state-' + st }, st)),
      h('td', {}, c.params ? h('code', {}, JSON.stringify(c.params)) : ''),
      h('td', {}, c.result ? h('code', {}, JSON.stringify(c.result)) : '', c.message ? h('div', {}, c.message) : null),
      h('td', {}, c.source || ''),
      h('td', {}, time(c.create_time)),
      h('td', {}, time(c.update_time)),
      h('td', {}, !FINAL.has(c.state) && session.can('command')
        ? h('button', { type: 'button', 'aria-label': `Cancel ${c.name} ${c.id}`, onclick: () => cancel(c) }, 'Cancel') : ''));
  }

  function show() {
    commands.sort((a, b) => Number(b.sequence || 0) - Number(a.sequence || 0));
    fill(tbody, commands.length ? commands.map(row) : h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No commands retained.')));
    const open = commands.filter((c) => !FINAL.has(c.state)).length;
    note.textContent = `${commands.length} command${commands.length === 1 ? '' : 's'}, newest first; ${open} not final. ` +
      (open ? 'States refresh every second.' : '');
  }

  async function load() {
    clearTimeout(timer);
    if (signal.aborted) return;
    try {
      const all = [];
      let token = '';
      do {
        const r = await call('twin.v1.CommandService/ListCommands', { device_id: arg, page_size: 1000, page_token: token }, { signal });
        all.push(...(r.commands || []));
        token = r.next_page_token || '';
      } while (token && all.length < 5000);
      commands = all;
      show();
    } catch (e) {
      if (e.name === 'AbortError') return;
      note.textContent = errText(e);
    }
    // Follow states while any command is still under way (and the tab is
    // seen); otherwise look again now and then for new ones.
    const busy = commands.some((c) => !FINAL.has(c.state));
    timer = setTimeout(load, busy && !document.hidden ? POLL_MS : 5000);
  }

  async function cancel(c) {
    try {
      await call('twin.v1.CommandService/CancelCommand', { id: c.id });
      say(`Canceled ${c.name}.`);
    } catch (e) {
      say(errText(e), 'error');
    }
    load();
  }

  function sendForm() {
    const name = h('input', { id: 'cmd-name', type: 'text', required: true, autocomplete: 'off', placeholder: 'defrost' });
    const params = h('textarea', { id: 'cmd-params', rows: 3, spellcheck: 'false', placeholder: '{"seconds": 30}' });
    const ttl = h('input', { id: 'cmd-ttl', type: 'text', placeholder: '1h', autocomplete: 'off' });
    const wait = h('input', { id: 'cmd-wait', type: 'text', value: '10s', autocomplete: 'off' });
    const out = h('div', { id: 'cmd-out', role: 'alert' });
    const send = h('button', { type: 'submit', class: 'primary' }, 'Send');
    return h('section', { class: 'panel', 'aria-labelledby': 'send-title' },
      h('h2', { id: 'send-title' }, 'Send a command'),
      h('form', { class: 'grid', onsubmit: async (ev) => {
        ev.preventDefault();
        const req = { device_id: arg, name: name.value.trim() };
        try {
          if (params.value.trim()) req.params = JSON.parse(params.value);
        } catch (e) {
          fill(out, h('p', { class: 'error' }, 'Params are not valid JSON: ' + e.message));
          params.focus();
          return;
        }
        for (const [input, key] of [[ttl, 'ttl'], [wait, 'wait']]) {
          const s = parseDuration(input.value);
          if (Number.isNaN(s)) {
            fill(out, h('p', { class: 'error' }, `${key} "${input.value}" is not a duration: write e.g. 30s, 5m or 1h.`));
            input.focus();
            return;
          }
          if (s > 0) req[key] = s + 's';
        }
        send.disabled = true;
        fill(out, h('p', { class: 'muted' }, req.wait ? `Sent; waiting up to ${fmtDuration(req.wait)} for a final state…` : 'Sending…'));
        load();
        setTimeout(load, 300); // show it queued while we wait
        try {
          const r = await call('twin.v1.CommandService/SendCommand', req);
          const c = r.command;
          fill(out, h('p', { class: FINAL.has(c.state) ? 'ok' : '' }, `${c.name}: ${stateName(c.state)}`,
            FINAL.has(c.state) ? '' : ' (not final yet; the table follows it)'));
        } catch (e) {
          fill(out, h('p', { class: 'error' }, errText(e)));
        } finally {
          send.disabled = false;
          load();
        }
      } },
      field('Name', name),
      field('Params (JSON object)', params),
      field('Time to live', ttl, 'How long it may wait for a final state; empty: the server default.'),
      field('Wait', wait, 'Block up to this long for a final state (empty or 0: return at once).'),
      h('div', { class: 'buttons' }, send), out));
  }

  signal.addEventListener('abort', () => clearTimeout(timer));
  if (arg) load();
}
