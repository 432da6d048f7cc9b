// The console's shell: it learns what the server offers (/console.json),
// asks for a key when one is needed, asks WhoAmI (when the server has it)
// what the key may do, and shows the page the location's hash names.

import { call, getKey, setKey, onUnauthenticated } from './api.js';
import { errText, say } from './ui.js';
import * as fleet from './fleet.js';
import * as twin from './twin.js';
import * as commands from './commands.js';
import * as rules from './rules.js';

// What each role may do, as the server's methodRoles (server/auth.go) has
// it: operators change desired state and send commands, provisioners
// create and delete twins and issue device tokens, admins also manage
// rules. An open server, or one without twin.v1.KeyService, lets the
// console show everything: the server checks every call either way.
const ALL = ['desired', 'command', 'rule', 'twin', 'token'];
const ROLES = {
  viewer: [],
  operator: ['desired', 'command'],
  provisioner: ['twin', 'token'],
  admin: ALL,
};

const session = {
  config: { services: [], auth_required: false },
  who: null, // {name, role} from WhoAmI, or null
  allowed: new Set(ALL),
  /** Whether the key may do action ('desired', 'command', 'rule', 'twin', 'token'). */
  can(action) {
    return this.allowed.has(action);
  },
};

/**
 * Asks the server who the key belongs to and what it may do. Without
 * twin.v1.KeyService (or when WhoAmI is not implemented), everything is
 * shown: the server checks every call anyway.
 */
async function whoami() {
  session.who = null;
  session.allowed = new Set(ALL);
  if (!session.config.services.includes('twin.v1.KeyService')) return;
  try {
    const r = await call('twin.v1.KeyService/WhoAmI', {});
    if (r.open || !r.key) return; // no key configured: everything
    const role = String(r.key.role || '').toLowerCase().replace(/^role_/, '');
    session.who = { name: r.key.name || '', role };
    session.allowed = new Set(ROLES[role] ?? []);
  } catch (e) {
    if (e.code !== 'unimplemented') throw e;
  }
}

function showWho() {
  const el = document.getElementById('who');
  el.textContent = session.who ? `${session.who.name} (${session.who.role})` : '';
  document.getElementById('key-button').hidden = !session.config.auth_required && !getKey();
}

// The key prompt. askKey resolves once a key that works is set.
let keyWaiters = [];
function askKey(message = '') {
  const dialog = document.getElementById('key-dialog');
  document.getElementById('key-error').textContent = message;
  if (!dialog.open) dialog.showModal();
  document.getElementById('key-input').focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function setupKeyDialog() {
  const dialog = document.getElementById('key-dialog');
  const input = document.getElementById('key-input');
  document.getElementById('key-form').addEventListener('submit', async (ev) => {
    ev.preventDefault();
    setKey(input.value.trim());
    try {
      await whoami();
      if (!session.who) await call('twin.v1.TwinService/ListTwins', { page_size: 1 });
    } catch (e) {
      document.getElementById('key-error').textContent = e.code === 'unauthenticated' ? 'That key is not valid.' : errText(e);
      return;
    }
    input.value = '';
    dialog.close();
    showWho();
    const waiters = keyWaiters;
    keyWaiters = [];
    waiters.forEach((w) => w());
  });
  document.getElementById('key-forget').addEventListener('click', () => {
    setKey('');
    input.value = '';
    document.getElementById('key-error').textContent = 'The key is forgotten.';
  });
  dialog.addEventListener('cancel', (ev) => {
    if (!getKey() && session.config.auth_required) ev.preventDefault(); // nothing works without one
  });
  document.getElementById('key-button').addEventListener('click', () => askKey().then(route));
  onUnauthenticated(() => {
    if (!document.getElementById('key-dialog').open) askKey('The server refused the key; give one that works.').then(route);
  });
}

const pages = { fleet, twin, commands, rules };
let current = null; // {abort: AbortController}

/** Shows the page the hash names: #/fleet, #/twin/<id>, #/commands/<id>, #/rules/<id>. */
function route() {
  const hash = location.hash || '#/fleet';
  const [path, query = ''] = hash.slice(2).split('?');
  const [name, ...rest] = path.split('/');
  const page = pages[name] ? name : 'fleet';
  const params = { arg: rest.map(decodeURIComponent).join('/'), query: new URLSearchParams(query) };
  if (current) current.abort();
  current = new AbortController();
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.page === page) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const main = document.getElementById('main');
  main.replaceChildren();
  const moveFocus = document.activeElement && document.activeElement !== document.body && !main.contains(document.activeElement);
  pages[page].render(main, params, { signal: current.signal, session });
  if (moveFocus) main.focus({ preventScroll: true });
}

async function start() {
  setupKeyDialog();
  try {
    const r = await fetch('/console.json');
    session.config = await r.json();
  } catch (e) {
    say('Cannot reach twind: ' + e.message, 'error');
    return;
  }
  showWho();
  if (session.config.auth_required && !getKey()) {
    await askKey();
  } else {
    try {
      await whoami();
    } catch (e) {
      if (e.code === 'unauthenticated') await new Promise((resolve) => keyWaiters.push(resolve));
      else say(errText(e), 'error');
    }
  }
  showWho();
  window.addEventListener('hashchange', route);
  route();
}

start();
