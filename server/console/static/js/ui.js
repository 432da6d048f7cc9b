// DOM helpers and formatting shared by the pages.

/**
 * Makes an element: h('button', {type: 'button', onclick: fn}, 'Save').
 * Attributes named on* are listeners; class, for, aria-* and data-* are
 * set as attributes; children may be strings, nodes, arrays or null.
 */
export function h(tag, attrs = {}, ...children) {
  const svg = ['svg', 'polyline', 'line', 'text', 'circle', 'g', 'title', 'rect', 'path'].includes(tag);
  const el = svg ? document.createElementNS('http://www.w3.org/2000/svg', tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'value' && !svg) el.value = v;
    else if (k === 'checked' && !svg) el.checked = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : String(c));
  }
}

/** Replaces the children of el. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** "2026-11-30 15:04:05" in local time, or "" */
export function fmtTime(ts) {
  if (!ts) return '';
  const d = new Date(ts);
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

/** "3 min ago" */
export function ago(ts) {
  if (!ts) return 'never';
  const s = Math.max(0, (Date.now() - new Date(ts).getTime()) / 1000);
  return fmtSpan(s) + ' ago';
}

/** A span of seconds in words: "45 s", "12 min", "3.5 h", "2.0 days". */
export function fmtSpan(s) {
  if (s < 1) return 'under a second';
  if (s < 60) return Math.round(s) + ' s';
  if (s < 3600) return Math.round(s / 60) + ' min';
  if (s < 86400) return (s / 3600).toFixed(1) + ' h';
  return (s / 86400).toFixed(1) + ' days';
}

/** A <time> element showing ts, with the full time as its title. */
export function time(ts, relative = false) {
  if (!ts) return h('span', { class: 'muted' }, '—');
  return h('time', { datetime: ts, title: fmtTime(ts) }, relative ? ago(ts) : fmtTime(ts));
}

/** Compact JSON of a value, for tables. */
export function short(v) {
  return typeof v === 'string' ? JSON.stringify(v) : JSON.stringify(v ?? null);
}

/**
 * The leaves of a JSON document as [pointer, value] pairs, with keys as JSON
 * Pointers (RFC 6901, as the twin's metadata names them): {"a": {"b": 1}}
 * gives [["/a/b", 1]]. Arrays are leaves.
 */
export function leaves(doc, prefix = '') {
  const out = [];
  for (const [k, v] of Object.entries(doc || {})) {
    const p = prefix + '/' + k.replaceAll('~', '~0').replaceAll('/', '~1');
    if (v && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length > 0) out.push(...leaves(v, p));
    else out.push([p, v]);
  }
  return out;
}

/** The value at a JSON Pointer, or undefined. */
export function at(doc, pointer) {
  let v = doc;
  for (const part of pointer.split('/').slice(1)) {
    if (!v || typeof v !== 'object') return undefined;
    v = v[part.replaceAll('~1', '/').replaceAll('~0', '~')];
  }
  return v;
}

/**
 * The RFC 7396 merge patch that turns a into b: changed keys with their
 * new values, removed keys as null, objects recursively.
 */
export function mergePatch(a, b) {
  const patch = {};
  for (const k of Object.keys(a || {})) if (!(k in b)) patch[k] = null;
  for (const [k, v] of Object.entries(b)) {
    const old = a?.[k];
    if (isObject(v) && isObject(old)) {
      const sub = mergePatch(old, v);
      if (Object.keys(sub).length) patch[k] = sub;
    } else if (JSON.stringify(v) !== JSON.stringify(old)) {
      patch[k] = v;
    }
  }
  return patch;
}

function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/** Parses "90s", "2m", "1h30m", "1.5h" or "45" (seconds) to seconds, or NaN. */
export function parseDuration(text) {
  text = text.trim();
  if (text === '') return 0;
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text);
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/g;
  let total = 0;
  let used = 0;
  for (const m of text.matchAll(re)) {
    total += Number(m[1]) * { ms: 0.001, s: 1, m: 60, h: 3600, d: 86400 }[m[2]];
    used += m[0].length;
  }
  return used === text.length ? total : NaN;
}

/** A protobuf Duration in JSON ("120s") as "2m", "1h30m", "45s". */
export function fmtDuration(d) {
  if (!d) return '';
  let s = parseFloat(d);
  const parts = [];
  for (const [unit, n] of [['h', 3600], ['m', 60]]) {
    if (s >= n) {
      parts.push(Math.floor(s / n) + unit);
      s %= n;
    }
  }
  if (s || !parts.length) parts.push(+s.toFixed(3) + 's');
  return parts.join('');
}

/** The line and column an error message names ("<input>:1:14:"), or null. */
export function position(message) {
  const m = /:(\d+):(\d+):/.exec(message || '');
  return m ? { line: Number(m[1]), column: Number(m[2]) } : null;
}

/** Says something in the page's status line (read out by screen readers). */
export function say(text, kind = 'info') {
  const el = document.getElementById('status');
  if (!el) return;
  el.className = 'status ' + kind;
  el.textContent = text;
  clearTimeout(say.timer);
  if (kind !== 'error') say.timer = setTimeout(() => { el.textContent = ''; el.className = 'status'; }, 6000);
}

/** The text of an error for a person. */
export function errText(e) {
  return e?.code ? `${e.code.toUpperCase()}: ${e.message}` : String(e?.message || e);
}

/** A labelled form field: label, then the control, then a hint. */
export function field(label, control, hint) {
  if (!control.id) control.id = 'f-' + Math.random().toString(36).slice(2, 9);
  return h('div', { class: 'field' },
    h('label', { for: control.id }, label),
    control,
    hint ? h('small', { class: 'hint' }, hint) : null);
}

/** A small presence badge: "● online" or "○ offline · seen 3 min ago". */
export function presence(p) {
  if (p?.connected) return h('span', { class: 'presence on', title: 'connected since ' + fmtTime(p.since) }, '● online');
  return h('span', { class: 'presence off', title: p?.last_seen ? 'last seen ' + fmtTime(p.last_seen) : 'never seen' },
    '○ offline', h('span', { class: 'muted' }, ' · seen ' + ago(p?.last_seen)));
}
