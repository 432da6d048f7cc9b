// A small client of twind's API over the Connect protocol with JSON: unary
// calls are a POST of the request as JSON; server streams send one framed
// message and read framed messages until the end-of-stream frame. See
// https://connectrpc.com/docs/protocol for the wire format.

const KEY_STORAGE = 'twind.key';

/** The API key of this tab (sessionStorage: gone when the tab closes). */
export function getKey() {
  return sessionStorage.getItem(KEY_STORAGE) || '';
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** An error answered by the server, with its Connect code (e.g. "not_found"). */
export class RPCError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'RPCError';
    this.code = code;
  }
}

let unauthenticated = () => {};

/** Sets what to do when a call is refused for its key. */
export function onUnauthenticated(fn) {
  unauthenticated = fn;
}

function headers(contentType) {
  const h = { 'Content-Type': contentType, 'Connect-Protocol-Version': '1' };
  const key = getKey();
  if (key) h.Authorization = 'Bearer ' + key;
  return h;
}

const httpCodes = { 400: 'invalid_argument', 401: 'unauthenticated', 403: 'permission_denied', 404: 'unimplemented',
  408: 'deadline_exceeded', 409: 'aborted', 429: 'resource_exhausted', 503: 'unavailable' };

function fail(code, message) {
  const err = new RPCError(code, message);
  if (code === 'unauthenticated') unauthenticated(err);
  return err;
}

/**
 * Calls a unary method, e.g. call('twin.v1.TwinService/GetTwin', {id}).
 * Resolves with the response; rejects with an RPCError.
 */
export async function call(method, request = {}, { signal } = {}) {
  let resp;
  try {
    resp = await fetch('/' + method, { method: 'POST', headers: headers('application/json'), body: JSON.stringify(request), signal });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new RPCError('unavailable', 'cannot reach twind: ' + e.message);
  }
  const text = await resp.text();
  let body = {};
  try {
    body = text ? JSON.parse(text) : {};
  } catch {
    body = { message: text };
  }
  if (!resp.ok) throw fail(body.code || httpCodes[resp.status] || 'unknown', body.message || resp.statusText);
  return body;
}

/**
 * Calls a server-streaming method. onMessage gets each response as it comes;
 * onOpen is called once the server has the stream in place (its headers
 * came). Resolves when the stream ends cleanly; rejects with an RPCError.
 */
export async function stream(method, request, onMessage, { signal, onOpen } = {}) {
  const json = new TextEncoder().encode(JSON.stringify(request));
  const body = new Uint8Array(5 + json.length);
  new DataView(body.buffer).setUint32(1, json.length);
  body.set(json, 5);
  let resp;
  try {
    resp = await fetch('/' + method, { method: 'POST', headers: headers('application/connect+json'), body, signal });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new RPCError('unavailable', 'cannot reach twind: ' + e.message);
  }
  if (!resp.ok) {
    let err = {};
    try {
      err = await resp.json();
    } catch { /* not JSON */ }
    throw fail(err.code || httpCodes[resp.status] || 'unknown', err.message || resp.statusText);
  }
  if (onOpen) onOpen();
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = new Uint8Array(0);
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new RPCError('unavailable', 'the stream ended without its end message');
    const joined = new Uint8Array(buf.length + value.length);
    joined.set(buf);
    joined.set(value, buf.length);
    buf = joined;
    while (buf.length >= 5) {
      const flags = buf[0];
      const size = new DataView(buf.buffer, buf.byteOffset + 1, 4).getUint32(0);
      if (buf.length < 5 + size) break;
      const msg = JSON.parse(decoder.decode(buf.subarray(5, 5 + size)) || '{}');
      buf = buf.slice(5 + size);
      if (flags & 2) {
        if (msg.error) throw fail(msg.error.code || 'unknown', msg.error.message || '');
        return;
      }
      onMessage(msg);
    }
  }
}

/**
 * Keeps a stream open until signal aborts: when it ends or fails, it opens
 * it again (after a pause that grows to 10 s), with request() asked anew so
 * that it can resume where it left off. onState gets 'live', 'connecting'
 * or an RPCError. An error in a request the server refuses for good
 * (invalid_argument, unauthenticated, permission_denied) stops it.
 */
export async function follow(method, request, onMessage, { signal, onState = () => {} } = {}) {
  let pause = 500;
  while (!signal?.aborted) {
    onState('connecting');
    try {
      await stream(method, request(), (m) => { pause = 500; onMessage(m); }, { signal, onOpen: () => onState('live') });
    } catch (e) {
      if (e.name === 'AbortError' || signal?.aborted) return;
      onState(e);
      if (['invalid_argument', 'unauthenticated', 'permission_denied', 'unimplemented'].includes(e.code)) return;
    }
    await new Promise((resolve) => {
      const t = setTimeout(resolve, pause);
      signal?.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
    });
    pause = Math.min(pause * 2, 10000);
  }
}
