// Fleet: the twins in a table, filtered by a CEL expression, paged, and
// kept live by a watch with the same filter.

import { call, follow } from './api.js';
import { h, fill, field, presence, short, time, say, errText, position } from './ui.js';

const PAGE_SIZE = 50;

export function render(main, { query }, { signal, session }) {
  const filter = query.get('filter') || '';
  const state = {
    filter,
    tokens: [''], // page tokens of the pages so far; the last is this page's
    next: '',
    twins: new Map(), // id -> twin, this page
    revision: 0,
  };

  const input = h('input', { id: 'filter', type: 'text', value: filter, spellcheck: 'false', autocomplete: 'off',
    placeholder: 'twin.type == "fridge" && twin.reported.temp_c > 8.0', 'aria-describedby': 'filter-help filter-error' });
  const filterError = h('div', { id: 'filter-error', class: 'error-box', role: 'alert' });
  const summary = h('p', { class: 'summary', 'aria-live': 'polite' });
  const live = h('span', { class: 'live', id: 'fleet-live' }, 'connecting…');
  const tbody = h('tbody');
  const prev = h('button', { type: 'button', disabled: true, onclick: () => { state.tokens.pop(); load(); } }, '← Previous');
  const next = h('button', { type: 'button', disabled: true, onclick: () => { state.tokens.push(state.next); load(); } }, 'Next →');

  const form = h('form', { class: 'filter', onsubmit: (ev) => {
    ev.preventDefault();
    const f = input.value.trim();
    const target = '#/fleet' + (f ? '?filter=' + encodeURIComponent(f) : '');
    if (location.hash === target) window.dispatchEvent(new HashChangeEvent('hashchange'));
    else location.hash = target;
  } },
  h('label', { for: 'filter' }, 'Filter (CEL over ', h('code', {}, 'twin'), ')'),
  h('div', { class: 'row' }, input, h('button', { type: 'submit', class: 'primary' }, 'Apply')),
  h('small', { id: 'filter-help', class: 'hint' }, 'e.g. ', h('code', {}, 'twin.presence.connected'), ', ',
    h('code', {}, 'twin.labels.site == "berlin"'), ', ', h('code', {}, 'has(twin.delta.target_c)')),
  filterError);

  main.append(
    h('h1', {}, 'Fleet'),
    form,
    h('div', { class: 'bar' }, summary, live),
    h('div', { class: 'table-wrap' }, h('table', { class: 'twins', id: 'twins' },
      h('caption', { class: 'sr-only' }, 'Twins, ordered by id'),
      h('thead', {}, h('tr', {},
        h('th', { scope: 'col' }, 'Id'), h('th', { scope: 'col' }, 'Type'), h('th', { scope: 'col' }, 'Presence'),
        h('th', { scope: 'col' }, 'Reported'), h('th', { scope: 'col' }, 'Delta'), h('th', { scope: 'col' }, 'Version'),
        h('th', { scope: 'col' }, 'Updated'))),
      tbody)),
    h('nav', { class: 'pager', 'aria-label': 'Pages of twins' }, prev, next),
    session.can('twin') ? createForm() : null,
  );

  function row(t) {
    const rep = Object.entries(t.reported || {});
    const delta = Object.keys(t.delta || {});
    return h('tr', { 'data-id': t.id },
      h('th', { scope: 'row' }, h('a', { href: '#/twin/' + encodeURIComponent(t.id) }, t.id)),
      h('td', {}, t.type || h('span', { class: 'muted' }, '—')),
      h('td', {}, presence(t.presence)),
      h('td', { class: 'reported' }, rep.length ? rep.slice(0, 6).map(([k, v]) => h('span', { class: 'kv' }, k + '=' + short(v))) : h('span', { class: 'muted' }, '—'),
        rep.length > 6 ? h('span', { class: 'muted' }, ` +${rep.length - 6}`) : null),
      h('td', {}, delta.length ? h('span', { class: 'badge warn', title: delta.join(', ') }, delta.length + ' pending') : h('span', { class: 'muted' }, 'in sync')),
      h('td', { class: 'num' }, t.version),
      h('td', {}, time(t.update_time, true)));
  }

  function show() {
    const ids = [...state.twins.keys()].sort();
    fill(tbody, ids.length ? ids.map((id) => row(state.twins.get(id)))
      : h('tr', {}, h('td', { colspan: 7, class: 'muted' }, state.filter ? 'No twin matches the filter on this page.' : 'No twins yet.')));
    const online = [...state.twins.values()].filter((t) => t.presence?.connected).length;
    const page = state.tokens.length;
    summary.textContent = `${ids.length} twin${ids.length === 1 ? '' : 's'} on page ${page}${state.next ? '' : ' (last)'} · ${online} online`;
    prev.disabled = state.tokens.length <= 1;
    next.disabled = !state.next;
  }

  async function load() {
    fill(filterError);
    input.removeAttribute('aria-invalid');
    let r;
    try {
      r = await call('twin.v1.TwinService/ListTwins', { filter: state.filter, page_size: PAGE_SIZE, page_token: state.tokens.at(-1) }, { signal });
    } catch (e) {
      if (e.name === 'AbortError') return;
      showFilterError(e);
      return;
    }
    state.twins = new Map((r.twins || []).map((t) => [t.id, t]));
    state.next = r.next_page_token || '';
    if (!state.revision) {
      state.revision = Number(r.revision || 0);
      watch();
    }
    show();
    if (r.filter_error_count > 0) {
      filterError.append(h('p', {}, `The filter failed on ${r.filter_error_count} twin(s) of this page, which are not listed: ${r.first_filter_error}`));
    }
  }

  function showFilterError(e) {
    if (e.code !== 'invalid_argument') {
      say(errText(e), 'error');
      return;
    }
    input.setAttribute('aria-invalid', 'true');
    const pos = position(e.message);
    fill(filterError,
      h('p', {}, pos ? `Line ${pos.line}, column ${pos.column}: ` : '', 'the filter is not valid.'),
      h('pre', {}, e.message));
    if (pos && pos.line === 1) {
      input.focus();
      input.setSelectionRange(pos.column - 1, pos.column);
    }
  }

  // The watch starts after the first page, from the revision it reflects,
  // so that no change between the two is missed.
  function watch() {
    follow('twin.v1.TwinService/WatchTwins', () => ({ filter: state.filter, start_revision: state.revision + 1 }), (m) => {
      const ev = m.event;
      state.revision = Math.max(state.revision, Number(ev.revision));
      if (ev.kind === 'TWIN_EVENT_KIND_IMPORTED') { load(); return; }
      const t = ev.twin;
      if (ev.kind === 'TWIN_EVENT_KIND_DELETED') {
        state.twins.delete(t.id);
      } else if (state.twins.has(t.id) || onThisPage(t.id)) {
        state.twins.set(t.id, t);
      }
      show();
      const tr = tbody.querySelector(`tr[data-id="${CSS.escape(t.id)}"]`);
      if (tr) tr.classList.add('flash');
    }, { signal, onState: (s) => {
      if (s === 'live') live.textContent = '● live';
      else if (s === 'connecting') live.textContent = 'connecting…';
      else { live.textContent = 'not live: ' + errText(s); if (s.code === 'invalid_argument') showFilterError(s); }
      live.className = 'live ' + (s === 'live' ? 'on' : 'off');
    } });
  }

  // Whether a twin not listed belongs between this page's first and last.
  function onThisPage(id) {
    const ids = [...state.twins.keys()].sort();
    if (state.tokens.length > 1 && ids.length && id < ids[0]) return false;
    if (state.next && ids.length && id > ids.at(-1)) return false;
    return true;
  }

  function createForm() {
    const id = h('input', { type: 'text', required: true, autocomplete: 'off', pattern: '[A-Za-z0-9._:\\-]{1,128}' });
    const type = h('input', { type: 'text', autocomplete: 'off', placeholder: 'fridge' });
    const labels = h('input', { type: 'text', autocomplete: 'off', placeholder: 'site=berlin, owner=ops' });
    return h('details', { class: 'panel' }, h('summary', {}, 'Create a twin'),
      h('form', { class: 'grid', onsubmit: async (ev) => {
        ev.preventDefault();
        const lab = {};
        for (const part of labels.value.split(',').map((s) => s.trim()).filter(Boolean)) {
          const [k, ...v] = part.split('=');
          lab[k.trim()] = v.join('=').trim();
        }
        try {
          await call('twin.v1.TwinService/CreateTwin', { twin: { id: id.value.trim(), type: type.value.trim(), labels: lab } });
          say(`Created ${id.value.trim()}.`);
          id.value = '';
        } catch (e) {
          say(errText(e), 'error');
        }
      } }, field('Id', id), field('Type', type), field('Labels', labels, 'key=value, comma-separated'),
      h('div', { class: 'buttons' }, h('button', { type: 'submit', class: 'primary' }, 'Create'))));
  }

  // Ages ("3 min ago") go stale: redraw them now and then.
  const tick = setInterval(show, 30000);
  signal.addEventListener('abort', () => clearInterval(tick));
  load();
}
