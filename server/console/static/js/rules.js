// Rules: the list with how each rule is doing, an editor that shows
// ValidateRule's issues at their fields as you type, a dry run with
// TestRule against a twin's current state, and the live rule events.

import { call, follow } from './api.js';
import { h, fill, field, time, say, errText, parseDuration, fmtDuration } from './ui.js';

const MAX_EVENTS = 200;

export function render(main, { arg }, { signal, session }) {
  const tbody = h('tbody');
  const events = h('ol', { class: 'events', id: 'rule-events' });
  const live = h('span', { class: 'live' }, 'connecting…');
  const editing = !!arg;

  main.append(
    h('h1', {}, 'Rules'),
    h('div', { class: 'table-wrap' }, h('table', { id: 'rules' },
      h('thead', {}, h('tr', {}, ['Rule', 'Types', 'Condition', 'Trigger', 'Fired', 'Last fired', 'Errors', 'Last error'].map((c) => h('th', { scope: 'col' }, c)))),
      tbody)),
    session.can('rule') ? h('p', {}, h('a', { href: '#/rules/new', class: 'button' }, 'New rule')) : null,
    editing ? h('div', { id: 'editor-slot' }) : null,
    h('section', { 'aria-labelledby': 'events-title' }, h('h2', { id: 'events-title' }, 'Rule events ', live), events),
  );

  async function loadRules() {
    try {
      const all = [];
      let token = '';
      do {
        const r = await call('twin.v1.RuleService/ListRules', { page_size: 1000, page_token: token }, { signal });
        all.push(...(r.rules || []));
        token = r.next_page_token || '';
      } while (token);
      fill(tbody, all.length ? all.map(ruleRow) : h('tr', {}, h('td', { colspan: 8, class: 'muted' }, 'No rules yet.')));
    } catch (e) {
      if (e.name !== 'AbortError') say(errText(e), 'error');
    }
  }

  function ruleRow(r) {
    const st = r.status || {};
    return h('tr', { 'data-id': r.id, class: r.enabled === false ? 'disabled' : '' },
      h('th', { scope: 'row' }, h('a', { href: '#/rules/' + encodeURIComponent(r.id) }, r.id),
        r.enabled === false ? h('span', { class: 'badge' }, 'disabled') : null,
        r.description ? h('div', { class: 'muted small' }, r.description) : null),
      h('td', {}, (r.types || []).join(', ') || h('span', { class: 'muted' }, 'all')),
      h('td', {}, h('code', {}, r.condition)),
      h('td', {}, String(r.trigger || 'TRIGGER_RISING').replace('TRIGGER_', '').toLowerCase().replace('_', ' '),
        r.hold_for ? ` · hold ${fmtDuration(r.hold_for)}` : '', r.cooldown ? ` · cooldown ${fmtDuration(r.cooldown)}` : ''),
      h('td', { class: 'num fires' }, st.fire_count || 0),
      h('td', {}, time(st.last_fire_time, true)),
      h('td', { class: 'num' }, st.error_count ? h('span', { class: 'badge bad' }, st.error_count) : 0),
      h('td', { class: 'small' }, st.last_error ? [st.last_error, ' ', time(st.last_error_time, true)] : ''));
  }

  function eventItem(e) {
    const kind = String(e.kind || '').replace('RULE_EVENT_KIND_', '').toLowerCase();
    const sev = String(e.severity || '').replace('SEVERITY_', '').toLowerCase();
    return h('li', { class: 'ev ' + kind + (sev ? ' sev-' + sev : '') },
      h('span', { class: 'when' }, time(e.time)),
      h('span', { class: 'what' }, kind === 'emit' ? sev || 'info' : kind), ' ',
      h('a', { href: '#/rules/' + encodeURIComponent(e.rule_id) }, e.rule_id), ' on ',
      h('a', { href: '#/twin/' + encodeURIComponent(e.twin_id) }, e.twin_id), ` v${e.twin_version}`,
      e.message ? h('span', { class: 'message' }, ' — ', e.message) : null);
  }

  let relist = 0;
  follow('twin.v1.RuleService/WatchRuleEvents', () => ({}), (m) => {
    events.querySelector('.placeholder')?.remove();
    events.prepend(eventItem(m.event));
    while (events.children.length > MAX_EVENTS) events.lastChild.remove();
    // Fire counts changed: list again, at most once a second.
    if (!relist) relist = setTimeout(() => { relist = 0; loadRules(); }, 1000);
  }, { signal, onState: (s) => {
    live.textContent = s === 'live' ? '● live' : s === 'connecting' ? 'connecting…' : 'not live: ' + errText(s);
    live.className = 'live ' + (s === 'live' ? 'on' : 'off');
    if (s === 'live' && !events.children.length) events.append(h('li', { class: 'muted placeholder' }, 'Events show here as rules fire.'));
  } });
  signal.addEventListener('abort', () => clearTimeout(relist));

  loadRules();
  if (editing) openEditor(arg === 'new' ? null : arg);

  async function openEditor(id) {
    let rule = { id: '', description: '', types: [], condition: '', trigger: 'TRIGGER_RISING', actions: [] };
    if (id) {
      try {
        rule = (await call('twin.v1.RuleService/GetRule', { id }, { signal })).rule;
      } catch (e) {
        if (e.name !== 'AbortError') fill(document.getElementById('editor-slot'), h('p', { class: 'error', role: 'alert' }, errText(e)));
        return;
      }
    }
    fill(document.getElementById('editor-slot'), editor(rule, !!id));
  }

  function editor(rule, existing) {
    const canEdit = session.can('rule');
    const issues = {}; // field -> element holding its issues
    const inputs = {};
    const issueBox = (name) => (issues[name] = h('div', { class: 'issues', id: 'issues-' + name.replace(/[^a-z0-9]/gi, '-'), role: 'alert' }));
    const withIssues = (name, control) => {
      control.setAttribute('aria-describedby', 'issues-' + name.replace(/[^a-z0-9]/gi, '-'));
      inputs[name] = control;
      return control;
    };
    const id = withIssues('id', h('input', { type: 'text', value: rule.id, required: true, readonly: existing, autocomplete: 'off', id: 'rule-id' }));
    const description = h('input', { type: 'text', value: rule.description || '', id: 'rule-description' });
    const types = withIssues('types', h('input', { type: 'text', value: (rule.types || []).join(', '), placeholder: 'fridge, planter (empty: all)', id: 'rule-types' }));
    const condition = withIssues('condition', h('textarea', { rows: 3, spellcheck: 'false', value: rule.condition || '', id: 'rule-condition',
      placeholder: 'twin.reported.temp_c > 8.0' }));
    const trigger = h('select', { id: 'rule-trigger' },
      h('option', { value: 'TRIGGER_RISING', selected: rule.trigger !== 'TRIGGER_WHILE_TRUE' }, 'rising: when it becomes true'),
      h('option', { value: 'TRIGGER_WHILE_TRUE', selected: rule.trigger === 'TRIGGER_WHILE_TRUE' }, 'while true: on every change while it holds'));
    const holdFor = withIssues('hold_for', h('input', { type: 'text', value: fmtDuration(rule.hold_for), placeholder: '2m', id: 'rule-hold' }));
    const cooldown = withIssues('cooldown', h('input', { type: 'text', value: fmtDuration(rule.cooldown), placeholder: '10m', id: 'rule-cooldown' }));
    const enabled = h('input', { type: 'checkbox', checked: rule.enabled !== false, id: 'rule-enabled' });
    const actionsBox = h('div', { class: 'actions', id: 'rule-actions' });
    const actions = [];
    const valid = h('p', { class: 'valid', id: 'rule-valid', 'aria-live': 'polite' });
    const other = h('div', { class: 'issues', role: 'alert' });
    const save = h('button', { type: 'submit', class: 'primary', id: 'rule-save', disabled: !canEdit }, existing ? 'Save rule' : 'Create rule');
    const result = h('div', { id: 'rule-result', role: 'alert' });

    function addAction(a = {}) {
      const kind = a.command ? 'command' : a.set_desired ? 'set_desired' : a.emit ? 'emit' : 'emit';
      const i = actions.length;
      const sel = h('select', { 'aria-label': `Action ${i + 1} kind` },
        ['command', 'set_desired', 'emit'].map((k) => h('option', { value: k, selected: k === kind }, { command: 'send a command', set_desired: 'set desired', emit: 'emit an event' }[k])));
      const name = h('input', { type: 'text', value: a.command?.name || '', placeholder: 'defrost', autocomplete: 'off' });
      const params = h('input', { type: 'text', value: a.command?.params || '', placeholder: '{"seconds": 30}', spellcheck: 'false' });
      const patch = h('input', { type: 'text', value: a.set_desired?.patch || '', placeholder: '{"pump": "on"}', spellcheck: 'false' });
      const severity = h('select', {}, ['SEVERITY_INFO', 'SEVERITY_WARNING', 'SEVERITY_CRITICAL'].map((s) =>
        h('option', { value: s, selected: (a.emit?.severity || 'SEVERITY_INFO') === s }, s.replace('SEVERITY_', '').toLowerCase())));
      const message = h('input', { type: 'text', value: a.emit?.message || '', placeholder: '"planter " + twin.id + " is dry"', spellcheck: 'false' });
      const parts = {
        command: [field('Command name', withIssues(`actions[${i}].command.name`, name)), issueBox(`actions[${i}].command.name`),
          field('Params (CEL map)', withIssues(`actions[${i}].command.params`, params)), issueBox(`actions[${i}].command.params`)],
        set_desired: [field('Patch (CEL map)', withIssues(`actions[${i}].set_desired.patch`, patch)), issueBox(`actions[${i}].set_desired.patch`)],
        emit: [field('Severity', severity), field('Message (CEL string)', withIssues(`actions[${i}].emit.message`, message)), issueBox(`actions[${i}].emit.message`)],
      };
      const body = h('div', { class: 'action-body' });
      const entry = { sel, name, params, patch, severity, message, removed: false };
      const box = h('fieldset', { class: 'action' }, h('legend', {}, `Action ${i + 1}`), field('Kind', sel), issueBox(`actions[${i}]`), body,
        h('button', { type: 'button', onclick: () => { entry.removed = true; box.remove(); changed(); } }, `Remove action ${i + 1}`));
      const showKind = () => fill(body, parts[sel.value]);
      sel.addEventListener('change', () => { showKind(); changed(); });
      showKind();
      actions.push(entry);
      actionsBox.append(box);
    }
    (rule.actions || []).forEach(addAction);

    function current() {
      const r = {
        id: id.value.trim(), description: description.value, condition: condition.value, trigger: trigger.value,
        types: types.value.split(',').map((s) => s.trim()).filter(Boolean), enabled: enabled.checked, actions: [],
      };
      for (const [input, key] of [[holdFor, 'hold_for'], [cooldown, 'cooldown']]) {
        const s = parseDuration(input.value);
        if (!Number.isNaN(s) && s > 0) r[key] = s + 's';
      }
      for (const a of actions) {
        if (a.removed) continue;
        if (a.sel.value === 'command') r.actions.push({ command: { name: a.name.value.trim(), params: a.params.value } });
        if (a.sel.value === 'set_desired') r.actions.push({ set_desired: { patch: a.patch.value } });
        if (a.sel.value === 'emit') r.actions.push({ emit: { severity: a.severity.value, message: a.message.value } });
      }
      return r;
    }

    // Validate as the user types, a quarter second after the last key.
    let pending = 0;
    let seq = 0;
    function changed() {
      clearTimeout(pending);
      pending = setTimeout(validate, 250);
    }
    async function validate() {
      const r = current();
      const mine = ++seq;
      const local = [];
      for (const [input, key] of [[holdFor, 'hold_for'], [cooldown, 'cooldown']]) {
        if (Number.isNaN(parseDuration(input.value))) local.push({ field: key, message: `"${input.value}" is not a duration: write e.g. 30s, 2m or 1h` });
      }
      let resp;
      try {
        resp = await call('twin.v1.RuleService/ValidateRule', { rule: r }, { signal });
      } catch (e) {
        if (e.name !== 'AbortError') fill(other, h('p', { class: 'error' }, errText(e)));
        return;
      }
      if (mine !== seq) return; // a newer check is under way
      showIssues([...local, ...(resp.issues || [])]);
      const ok = !local.length && !(resp.issues || []).length;
      valid.textContent = ok ? `✓ Valid. Estimated worst-case cost ${resp.cost_estimate ?? 0}.` : '';
      valid.className = 'valid' + (ok ? ' ok' : '');
      save.disabled = !ok || !canEdit;
    }
    function showIssues(list) {
      for (const el of Object.values(issues)) fill(el);
      for (const el of Object.values(inputs)) el.removeAttribute('aria-invalid');
      fill(other);
      for (const is of list) {
        const where = is.line ? `line ${is.line}, column ${is.column}: ` : '';
        const p = h('p', { class: 'issue' }, where, is.message);
        const key = Object.keys(issues).find((k) => k === is.field) ?? Object.keys(issues).find((k) => is.field?.startsWith(k + '.'));
        if (key && issues[key]) {
          issues[key].append(p);
          inputs[key]?.setAttribute('aria-invalid', 'true');
        } else {
          other.append(h('p', { class: 'issue' }, h('code', {}, is.field || 'rule'), ': ', where, is.message));
        }
      }
    }

    const form = h('form', { class: 'rule-form', oninput: changed, onchange: changed, onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const r = current();
        const resp = existing ? await call('twin.v1.RuleService/UpdateRule', { rule: r }) : await call('twin.v1.RuleService/CreateRule', { rule: r });
        fill(result, h('p', { class: 'ok' }, `${existing ? 'Saved' : 'Created'} ${resp.rule.id}.`));
        say(`${existing ? 'Saved' : 'Created'} rule ${resp.rule.id}.`);
        loadRules();
        if (!existing) location.hash = '#/rules/' + encodeURIComponent(resp.rule.id);
      } catch (e) {
        fill(result, h('p', { class: 'error' }, errText(e)));
      }
    } },
    h('h2', {}, existing ? `Edit ${rule.id}` : 'New rule'),
    h('div', { class: 'grid' },
      h('div', {}, field('Id', id), issueBox('id')),
      field('Description', description),
      h('div', {}, field('Device types', types, 'comma-separated; empty watches all'), issueBox('types')),
      field('Trigger', trigger),
      h('div', {}, field('Hold for', holdFor, 'the condition must hold this long first'), issueBox('hold_for')),
      h('div', {}, field('Cooldown', cooldown, 'at most one firing per twin in this window'), issueBox('cooldown')),
      h('div', { class: 'field check' }, enabled, h('label', { for: 'rule-enabled' }, 'Enabled'))),
    h('div', {}, field('Condition (CEL over twin, prev and now)', condition), issueBox('condition')),
    h('h3', {}, 'Actions'), actionsBox,
    h('button', { type: 'button', onclick: () => { addAction({ emit: {} }); changed(); } }, 'Add an action'),
    other, valid,
    h('div', { class: 'buttons' }, save,
      existing && canEdit ? h('button', { type: 'button', class: 'danger', onclick: async () => {
        if (!confirm(`Delete rule ${rule.id}?`)) return;
        try {
          await call('twin.v1.RuleService/DeleteRule', { id: rule.id });
          say(`Deleted rule ${rule.id}.`);
          location.hash = '#/rules';
        } catch (e) {
          fill(result, h('p', { class: 'error' }, errText(e)));
        }
      } }, 'Delete rule') : null),
    result);
    if (rule.condition || existing) validate();
    return h('section', { class: 'panel editor' }, form, dryRun(current));
  }

  function dryRun(current) {
    const twinId = h('input', { type: 'text', id: 'dry-twin', autocomplete: 'off', list: 'dry-twins' });
    const list = h('datalist', { id: 'dry-twins' });
    const out = h('div', { id: 'dry-out', 'aria-live': 'polite' });
    call('twin.v1.TwinService/ListTwins', { page_size: 200 }, { signal })
      .then((r) => fill(list, (r.twins || []).map((t) => h('option', { value: t.id })))).catch(() => {});
    return h('form', { class: 'dry-run', onsubmit: async (ev) => {
      ev.preventDefault();
      try {
        const t = (await call('twin.v1.TwinService/GetTwin', { id: twinId.value.trim() })).twin;
        // Before: the same twin with nothing reported or desired, as if
        // it were new, so a RISING rule fires if the condition holds now.
        const before = { id: t.id, type: t.type, labels: t.labels };
        const r = await call('twin.v1.RuleService/TestRule', { rule: current(), before, after: t });
        fill(out,
          h('p', { class: r.fired ? 'ok' : '' }, r.fired ? 'It would fire.' : 'It would not fire.',
            ` The condition is ${!!r.condition} now (version ${t.version}) and ${!!r.previous_condition} on the twin as if new.`),
          r.error ? h('p', { class: 'error' }, 'Evaluation error: ' + r.error) : null,
          (r.commands || []).length ? h('p', {}, 'Commands: ', r.commands.map((c) => h('code', {}, `${c.name} ${JSON.stringify(c.params || {})}`))) : null,
          r.desired_patch ? h('p', {}, 'Desired patch: ', h('code', {}, JSON.stringify(r.desired_patch))) : null,
          (r.events || []).length ? h('p', {}, 'Events: ', r.events.map((e) => h('code', {}, `${String(e.severity || 'SEVERITY_INFO').replace('SEVERITY_', '').toLowerCase()}: ${e.message}`))) : null);
      } catch (e) {
        fill(out, h('p', { class: 'error' }, errText(e)));
      }
    } },
    h('h3', {}, 'Dry run'),
    h('p', { class: 'hint' }, 'Evaluates the rule as edited against a twin\'s current state, with no side effects (TestRule).'),
    h('div', { class: 'row' }, field('Twin', twinId), list, h('button', { type: 'submit' }, 'Dry run')), out);
  }
}
