// Twin: one twin's reported, desired and delta side by side with each
// leaf's metadata, its presence, a chart of a numeric reported field over
// its history, the desired editor, its device token, and its history; all
// kept live by a watch.

import { call, follow } from './api.js';
import { h, fill, field, presence, short, time, say, errText, leaves, at, mergePatch } from './ui.js';
import { lineChart, coverage } from './chart.js';

const HISTORY_PAGE = 1000;

export function render(main, { arg: id }, { signal, session }) {
  // field is the chart's; chosen says the user picked it.
  const state = { twin: null, history: [], historyNext: '', field: '', chosen: false, editing: false };
  let editor; // the desired editor's parts, if the key may edit desired
  const head = h('div', { class: 'twin-head' });
  const docs = h('div', { class: 'docs' });
  const chartBox = h('div', { class: 'chart-box' });
  const chartNote = h('p', { class: 'hint', id: 'chart-note' });
  const fieldSelect = h('select', { id: 'chart-field', onchange: () => { state.field = fieldSelect.value; state.chosen = true; drawChart(); } });
  const timeline = h('ol', { class: 'timeline', id: 'history' });
  const more = h('button', { type: 'button', hidden: true, onclick: () => loadHistory(true) }, 'Older changes');
  const live = h('span', { class: 'live' }, 'connecting…');

  main.append(
    h('p', { class: 'crumbs' }, h('a', { href: '#/fleet' }, 'Fleet'), ' / ', id),
    head,
    h('section', { 'aria-labelledby': 'docs-title' }, h('h2', { id: 'docs-title' }, 'State ', live), docs),
    h('section', { 'aria-labelledby': 'chart-title', class: 'panel' },
      h('h2', { id: 'chart-title' }, 'Chart'),
      field('Reported field', fieldSelect), chartBox, chartNote),
    session.can('desired') ? desiredEditor() : null,
    session.can('token') ? tokenPanel() : null,
    h('section', { 'aria-labelledby': 'history-title' }, h('h2', { id: 'history-title' }, 'History'), timeline, more),
  );

  function docTable(title, doc, meta, cls) {
    const rows = leaves(doc);
    return h('div', { class: 'doc ' + cls },
      h('h3', {}, title),
      rows.length ? h('div', { class: 'table-wrap' }, h('table', { class: 'leaves', id: 'doc-' + cls },
        h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Field'), h('th', { scope: 'col' }, 'Value'),
          meta ? [h('th', { scope: 'col' }, 'Updated'), h('th', { scope: 'col' }, 'Version')] : null)),
        h('tbody', {}, rows.map(([p, v]) => h('tr', { 'data-path': p },
          h('th', { scope: 'row' }, h('code', {}, p)),
          h('td', { class: v === null ? 'tombstone' : '' }, v === null && cls === 'delta' ? 'null (removed; not yet acknowledged)' : short(v)),
          meta ? [h('td', {}, time(meta[p]?.update_time)), h('td', { class: 'num' }, meta[p]?.version ?? '')] : null)))))
        : h('p', { class: 'muted' }, cls === 'delta' ? 'Nothing pending: the device is in sync.' : 'Empty.'));
  }

  function showTwin() {
    const t = state.twin;
    const labels = Object.entries(t.labels || {});
    fill(head,
      h('h1', {}, t.id, ' ', t.type ? h('span', { class: 'type' }, t.type) : null),
      h('p', { class: 'facts' },
        presence(t.presence), ' · version ', h('strong', { id: 'twin-version' }, t.version), ' · updated ', time(t.update_time),
        ' · created ', time(t.create_time),
        t.presence?.connected ? [' · connected since ', time(t.presence.since)] : null,
        Number(t.desired_acked_version) ? ` · device applied desired up to version ${t.desired_acked_version}` : null),
      labels.length ? h('p', { class: 'labels' }, labels.map(([k, v]) => h('span', { class: 'chip' }, `${k}=${v}`))) : null,
      h('p', {}, h('a', { href: '#/commands/' + encodeURIComponent(t.id) }, 'Commands of this twin')));
    fill(docs,
      docTable('Reported', t.reported, t.metadata?.reported || {}, 'reported'),
      docTable('Desired', t.desired, t.metadata?.desired || {}, 'desired'),
      docTable('Delta', t.delta, null, 'delta'));
    // The chart's field choice: every numeric reported leaf.
    const numeric = leaves(t.reported).filter(([, v]) => typeof v === 'number').map(([p]) => p);
    for (const ev of state.history) {
      for (const [p, v] of leaves(ev.twin?.reported)) if (typeof v === 'number' && !numeric.includes(p)) numeric.push(p);
    }
    if (!state.chosen || !numeric.includes(state.field)) {
      // The field that changed most often in the history: what is worth a chart.
      const changes = (p) => new Set(state.history.map((ev) => at(ev.twin?.reported, p))).size;
      state.field = numeric.reduce((best, p) => (best === '' || changes(p) > changes(best) ? p : best), '');
    }
    fill(fieldSelect, numeric.length ? numeric.map((p) => h('option', { value: p, selected: p === state.field }, p)) : h('option', { value: '' }, 'no numeric field'));
    fieldSelect.disabled = !numeric.length;
    refreshEditor();
  }

  function drawChart() {
    // History is newest first; a point per change of the field.
    const points = [];
    let last;
    for (const ev of [...state.history].reverse()) {
      const v = at(ev.twin?.reported, state.field);
      if (typeof v !== 'number' || (ev.kind !== 'TWIN_EVENT_KIND_REPORTED' && ev.kind !== 'TWIN_EVENT_KIND_CREATED')) continue;
      if (v === last && points.length) { points.at(-1).until = new Date(ev.time); continue; }
      points.push({ t: new Date(ev.time), v });
      last = v;
    }
    fill(chartBox, state.field ? lineChart(points, state.field) : h('p', { class: 'muted' }, 'The twin has reported no number yet.'));
    chartNote.textContent = state.field ? `${state.field}: ` + coverage(points, !state.historyNext) : '';
    chartBox.dataset.points = points.length;
  }

  function eventItem(ev) {
    const what = { TWIN_EVENT_KIND_CREATED: 'created', TWIN_EVENT_KIND_REPORTED: 'reported', TWIN_EVENT_KIND_DESIRED: 'desired',
      TWIN_EVENT_KIND_UPDATED: 'type or labels', TWIN_EVENT_KIND_DELETED: 'deleted', TWIN_EVENT_KIND_PRESENCE: 'presence' }[ev.kind] || ev.kind;
    return h('li', { class: 'ev ' + what.split(' ')[0] },
      h('span', { class: 'when' }, time(ev.time)),
      h('span', { class: 'what' }, what), ' ',
      h('span', { class: 'muted' }, `v${ev.twin?.version ?? '?'} · rev ${ev.revision} · by ${ev.source || '?'}`),
      ev.patch ? h('code', { class: 'patch' }, JSON.stringify(ev.patch)) : null);
  }

  function showHistory() {
    fill(timeline, state.history.length ? state.history.map(eventItem) : h('li', { class: 'muted' }, 'No retained history.'));
    more.hidden = !state.historyNext;
  }

  async function loadHistory(older = false) {
    try {
      const r = await call('twin.v1.TwinService/ListTwinHistory', { id, page_size: HISTORY_PAGE, page_token: older ? state.historyNext : '' }, { signal });
      state.history = older ? state.history.concat(r.events || []) : r.events || [];
      state.historyNext = r.next_page_token || '';
    } catch (e) {
      if (e.name !== 'AbortError') say(errText(e), 'error');
      return;
    }
    showHistory();
    showTwin();
    drawChart();
  }

  async function load() {
    try {
      state.twin = (await call('twin.v1.TwinService/GetTwin', { id }, { signal })).twin;
    } catch (e) {
      if (e.name === 'AbortError') return;
      fill(head, h('h1', {}, id), h('p', { class: 'error', role: 'alert' }, errText(e)));
      return;
    }
    showTwin();
    await loadHistory();
    watch(Number(state.twin.revision || 0));
  }

  function watch(from) {
    let revision = from;
    follow('twin.v1.TwinService/WatchTwins', () => ({ filter: `twin.id == ${JSON.stringify(id)}`, start_revision: revision + 1 }), (m) => {
      const ev = m.event;
      revision = Math.max(revision, Number(ev.revision));
      if (ev.kind === 'TWIN_EVENT_KIND_IMPORTED') { load(); return; }
      if (ev.kind === 'TWIN_EVENT_KIND_DELETED') {
        say(`${id} was deleted.`, 'error');
        return;
      }
      state.twin = ev.twin;
      if (ev.kind !== 'TWIN_EVENT_KIND_PRESENCE') state.history.unshift(ev);
      showTwin();
      showHistory();
      drawChart();
    }, { signal, onState: (s) => {
      live.textContent = s === 'live' ? '● live' : s === 'connecting' ? 'connecting…' : 'not live: ' + errText(s);
      live.className = 'live ' + (s === 'live' ? 'on' : 'off');
    } });
  }

  // The desired editor: the whole document as JSON; saving sends the merge
  // patch from the version it was loaded at, with expected_version, so
  // that a write by someone else in between is refused, not overwritten.
  function desiredEditor() {
    const text = h('textarea', { id: 'desired-json', rows: 8, spellcheck: 'false', 'aria-describedby': 'desired-msg',
      oninput: () => { state.editing = true; check(); } });
    const expected = h('input', { id: 'desired-expected', type: 'number', min: 0, inputmode: 'numeric' });
    const msg = h('div', { id: 'desired-msg', role: 'alert', class: 'msg' });
    const save = h('button', { type: 'submit', class: 'primary' }, 'Save desired');
    const revert = h('button', { type: 'button', onclick: () => { state.editing = false; refreshEditor(true); } }, 'Reload');
    editor = { text, expected, msg, base: {} };
    function check() {
      try {
        const v = JSON.parse(text.value || '{}');
        if (!v || typeof v !== 'object' || Array.isArray(v)) throw new Error('desired must be a JSON object');
        text.removeAttribute('aria-invalid');
        fill(msg);
        save.disabled = false;
        return v;
      } catch (e) {
        text.setAttribute('aria-invalid', 'true');
        fill(msg, h('p', { class: 'error' }, 'Not valid JSON: ' + e.message));
        save.disabled = true;
        return null;
      }
    }
    return h('section', { class: 'panel', 'aria-labelledby': 'desired-title' },
      h('h2', { id: 'desired-title' }, 'Edit desired'),
      h('form', { onsubmit: async (ev) => {
        ev.preventDefault();
        const doc = check();
        if (!doc) return;
        const patch = mergePatch(editor.base, doc);
        if (!Object.keys(patch).length) { fill(msg, h('p', {}, 'Nothing changed.')); return; }
        try {
          const r = await call('twin.v1.TwinService/UpdateDesired', { id, patch, expected_version: Number(expected.value || 0) });
          state.twin = r.twin;
          state.editing = false;
          showTwin();
          refreshEditor(true);
          fill(msg, h('p', { class: 'ok' }, `Saved: version ${r.twin.version}. Patch sent: `, h('code', {}, JSON.stringify(patch))));
        } catch (e) {
          if (e.code === 'failed_precondition' || e.code === 'aborted') {
            fill(msg, h('p', { class: 'error' }, `Someone else changed ${id} after you loaded version ${expected.value}: `,
              `it is now at version ${state.twin.version}. Your edit is kept here; press Reload to see their change, then edit again.`),
            h('p', { class: 'muted' }, e.message));
          } else {
            fill(msg, h('p', { class: 'error' }, errText(e)));
          }
        }
      } },
      field('Desired (JSON)', text, 'The whole desired document. Saving sends an RFC 7396 merge patch: removed keys become null.'),
      field('Expected version', expected, 'The write fails if the twin is no longer at this version (0: write anyway).'),
      h('div', { class: 'buttons' }, save, revert), msg));
  }

  function refreshEditor(force = false) {
    if (!editor || !state.twin) return;
    if (state.editing && !force) {
      if (Number(editor.expected.value) !== Number(state.twin.version) && !editor.msg.textContent) {
        fill(editor.msg, h('p', { class: 'muted' }, `The twin changed (now version ${state.twin.version}) while you edit.`));
      }
      return;
    }
    editor.base = state.twin.desired || {};
    editor.text.value = JSON.stringify(editor.base, null, 2);
    editor.expected.value = state.twin.version;
  }

  function tokenPanel() {
    const out = h('div', { id: 'token-out', 'aria-live': 'polite' });
    return h('section', { class: 'panel', 'aria-labelledby': 'token-title' },
      h('h2', { id: 'token-title' }, 'Device token'),
      h('p', { class: 'hint' }, 'The device presents it in its Connect hello. It is shown once and stored only as a hash; issuing a new one revokes the old.'),
      h('button', { type: 'button', id: 'issue-token', onclick: async () => {
        if (!confirm(`Issue a new token for ${id}? Its current token stops working.`)) return;
        try {
          const r = await call('twin.v1.TwinService/IssueDeviceToken', { id });
          const tok = h('input', { type: 'text', readonly: true, value: r.token, id: 'token-value', class: 'token' });
          fill(out, field('New token (copy it now: it is not shown again)', tok),
            h('button', { type: 'button', onclick: () => navigator.clipboard?.writeText(r.token).then(() => say('Copied.')) }, 'Copy'));
          tok.focus();
          tok.select();
        } catch (e) {
          fill(out, h('p', { class: 'error' }, errText(e)));
        }
      } }, 'Issue a new token'), out);
  }

  const tick = setInterval(() => state.twin && showTwin(), 30000);
  signal.addEventListener('abort', () => clearInterval(tick));
  load();
}
