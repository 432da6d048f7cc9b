#!/usr/bin/env node
// A twind client in Node.js, with @grpc/grpc-js and @grpc/proto-loader
// loading the API's .proto files at run time: no generated code.
//
//   npm ci --prefix clients/node
//   node clients/node/twind_client.js --addr localhost:50051
//
// It plays an operator and a device: it creates a car twin, sets desired
// state, sends a command while the car is offline, connects as the car over
// DeviceService.Connect, receives the command, acknowledges it, reports
// state, and checks the result through the operator API.
'use strict';

const path = require('node:path');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const protoDir = path.join(__dirname, '..', '..', 'proto');

function load() {
  const def = protoLoader.loadSync(
    ['twin/v1/twin.proto', 'twin/v1/device.proto', 'twin/v1/command.proto', 'twin/v1/rule.proto'],
    { includeDirs: [protoDir], keepCase: true, longs: String, enums: String, defaults: false, oneofs: true },
  );
  return grpc.loadPackageDefinition(def).twin.v1;
}

// JSON values <-> google.protobuf.Value / Struct as proto-loader sees them.
function toValue(v) {
  if (v === null) return { nullValue: 'NULL_VALUE' };
  if (Array.isArray(v)) return { listValue: { values: v.map(toValue) } };
  switch (typeof v) {
    case 'number': return { numberValue: v };
    case 'string': return { stringValue: v };
    case 'boolean': return { boolValue: v };
    default: return { structValue: toStruct(v) };
  }
}
function toStruct(obj) {
  const fields = {};
  for (const [k, v] of Object.entries(obj)) fields[k] = toValue(v);
  return { fields };
}
function fromValue(v) {
  switch (v.kind) {
    case 'nullValue': return null;
    case 'numberValue': return v.numberValue;
    case 'stringValue': return v.stringValue;
    case 'boolValue': return v.boolValue;
    case 'listValue': return (v.listValue.values || []).map(fromValue);
    case 'structValue': return fromStruct(v.structValue);
    default: return undefined;
  }
}
function fromStruct(s) {
  const out = {};
  for (const [k, v] of Object.entries((s && s.fields) || {})) out[k] = fromValue(v);
  return out;
}

// metadata carries the API token, if the server requires one.
const metadata = new grpc.Metadata();

// call turns a unary method into a promise.
function call(client, method, req) {
  return new Promise((resolve, reject) => {
    client[method](req, metadata, { deadline: Date.now() + 10_000 }, (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

// next returns a promise of the stream's next message.
function reader(stream) {
  const queue = [];
  const waiters = [];
  let ended = null;
  stream.on('data', (m) => (waiters.length ? waiters.shift().resolve(m) : queue.push(m)));
  const end = (err) => {
    ended = err || new Error('stream ended');
    while (waiters.length) waiters.shift().reject(ended);
  };
  stream.on('error', end);
  stream.on('end', () => end());
  return () => new Promise((resolve, reject) => {
    if (queue.length) return resolve(queue.shift());
    if (ended) return reject(ended);
    waiters.push({ resolve, reject });
  });
}

async function run(addr) {
  const api = load();
  const creds = grpc.credentials.createInsecure();
  const twins = new api.TwinService(addr, creds);
  const commands = new api.CommandService(addr, creds);
  const devices = new api.DeviceService(addr, creds);
  const id = `car-js-${crypto.randomBytes(4).toString('hex')}`;

  // The operator creates the twin and says what it should be.
  await call(twins, 'CreateTwin', { twin: { id, type: 'car', labels: { client: 'node' } } });
  let { twin } = await call(twins, 'UpdateDesired', { id, patch: toStruct({ locked: true }) });
  assert.deepEqual(fromStruct(twin.delta), { locked: true });
  const { token } = await call(twins, 'IssueDeviceToken', { id });
  const { command } = await call(commands, 'SendCommand', {
    device_id: id, name: 'navigate', params: toStruct({ lat: 52.5163, lon: 13.3777 }),
  });
  assert.equal(command.state, 'COMMAND_STATE_QUEUED');
  console.log(`created ${id}, desired version ${twin.version}, queued command ${command.id}`);

  // The car connects.
  const stream = devices.Connect();
  const next = reader(stream);
  stream.write({ hello: { device_id: id, token } });
  const first = await next();
  assert.equal(first.msg, 'welcome', `first message: ${JSON.stringify(first)}`);
  assert.deepEqual(fromStruct(first.welcome.desired), { locked: true });
  console.log(`welcome at version ${first.welcome.version}`);

  const m = await next();
  assert.equal(m.msg, 'command');
  assert.equal(m.command.id, command.id);
  assert.deepEqual(fromStruct(m.command.params), { lat: 52.5163, lon: 13.3777 });
  console.log(`received command ${m.command.name}`);
  stream.write({ command_update: { command_id: command.id, state: 'COMMAND_STATE_ACCEPTED' } });
  stream.write({ command_update: { command_id: command.id, state: 'COMMAND_STATE_SUCCEEDED', result: toStruct({ eta_min: 12 }) } });
  stream.write({ desired_ack: { version: first.welcome.version } });
  stream.write({ report: { seq: 1, patch: toStruct({ locked: true, fuel: 0.42, speed_kmh: 0 }) } });
  for (;;) {
    const r = await next();
    if (r.msg !== 'report_ack') continue;
    assert.equal(r.report_ack.seq, '1');
    assert.ok(!r.report_ack.error, r.report_ack.error);
    console.log(`report acknowledged at version ${r.report_ack.version}`);
    break;
  }
  stream.end();
  await next().catch(() => {}); // the server answers what is left, then ends

  // The operator sees the outcome.
  const got = (await call(commands, 'GetCommand', { id: command.id })).command;
  assert.equal(got.state, 'COMMAND_STATE_SUCCEEDED');
  assert.deepEqual(fromStruct(got.result), { eta_min: 12 });
  twin = (await call(twins, 'GetTwin', { id })).twin;
  assert.equal(fromStruct(twin.reported).fuel, 0.42);
  assert.deepEqual(fromStruct(twin.delta), {});
  await call(twins, 'DeleteTwin', { id });
  console.log(`command ${got.id} ${got.state}; ${id} in sync; deleted`);
  for (const c of [twins, commands, devices]) c.close();
}

function flag(name, env, def) {
  const i = process.argv.indexOf(name);
  return i > 0 ? process.argv[i + 1] : (process.env[env] || def);
}
const addr = flag('--addr', 'TWIND_ADDR', 'localhost:50051');
const token = flag('--token', 'TWIND_TOKEN', '');
if (token) metadata.set('authorization', `Bearer ${token}`);
run(addr).then(
  () => console.log('1 passed, 0 failed'),
  (err) => {
    console.error('FAILED:', err.message || err);
    console.log('0 passed, 1 failed');
    process.exitCode = 1;
  },
);
