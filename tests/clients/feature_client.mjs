// A feature server client in JavaScript (Node.js), written from docs/protocol.md alone: Arrow Flight over
// @grpc/grpc-js with Flight's service definition (flight.proto beside this file), the Arrow IPC framing of FlightData
// done here, the batches read and written by apache-arrow. tests/test_js_client.py runs it and compares its answers
// with the Python FeatureClient's.
//
// Usage: node feature_client.mjs <location> <plan.json>
// The plan is {"token": ..., "steps": [{"op": ..., ...}]}; every step prints one JSON line, {"error": {...}} when its
// call failed. Tables go to Arrow IPC files (a step's "out"), for the test to compare with pyarrow's.

import { once } from 'node:events';
import { readFileSync, writeFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import * as arrow from 'apache-arrow';

const PROTO = fileURLToPath(new URL('./flight.proto', import.meta.url));
const { FlightService } = grpc.loadPackageDefinition(
  protoLoader.loadSync(PROTO, { keepCase: true, longs: String, enums: String, defaults: true }),
).arrow.flight.protocol;

// ---------------------------------------------------------------------------------------------------------------
// JSON that keeps 64-bit integers: snapshot ids use all 63 bits, which JSON.parse would round (protocol.md,
// "Snapshot ids"). Integers beyond 2^53 become BigInts, and are written back as plain digits.

export function parseJson(text) {
  if (text === '') return null; // an online request's FlightInfo has no app_metadata
  let at = 0;
  const space = () => { while (/\s/.test(text[at] ?? '')) at++; };
  const value = () => {
    space();
    const c = text[at];
    if (c === '{') {
      at++;
      const object = {};
      space();
      if (text[at] === '}') { at++; return object; }
      for (;;) {
        space();
        const key = value();
        space(); at++; // ':'
        object[key] = value();
        space();
        if (text[at++] === '}') return object;
      }
    }
    if (c === '[') {
      at++;
      const list = [];
      space();
      if (text[at] === ']') { at++; return list; }
      for (;;) {
        list.push(value());
        space();
        if (text[at++] === ']') return list;
      }
    }
    if (c === '"') {
      const end = /"(?:[^"\\]|\\.)*"/y;
      end.lastIndex = at;
      const [literal] = end.exec(text);
      at += literal.length;
      return JSON.parse(literal);
    }
    const token = /-?\d+(\.\d+)?([eE][+-]?\d+)?|true|false|null/y;
    token.lastIndex = at;
    const match = token.exec(text);
    if (!match) throw new SyntaxError(`bad JSON at ${at}: ${text.slice(at, at + 20)}`);
    at += match[0].length;
    const number = JSON.parse(match[0]);
    return Number.isInteger(number) && !Number.isSafeInteger(number) && /^-?\d+$/.test(match[0])
      ? BigInt(match[0]) : number;
  };
  const result = value();
  space();
  if (at !== text.length) throw new SyntaxError(`bad JSON: trailing ${text.slice(at, at + 20)}`);
  return result;
}

export function stringify(value) {
  if (typeof value === 'bigint') return value.toString();
  if (Array.isArray(value)) return `[${value.map(stringify).join(', ')}]`;
  if (value instanceof Map) return stringify(Object.fromEntries(value));
  if (value !== null && typeof value === 'object') {
    return `{${Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${stringify(v ?? null)}`).join(', ')}}`;
  }
  return JSON.stringify(value ?? null);
}

const utf8 = (value) => Buffer.from(typeof value === 'string' ? value : stringify(value));

// ---------------------------------------------------------------------------------------------------------------
// FlightData <-> Arrow IPC. A FlightData holds one IPC message: data_header its flatbuffer Message, data_body its
// body. An IPC stream frames each message as 0xFFFFFFFF, the header's length (padded to 8 bytes), the header, the
// body; a length of 0 ends the stream.

const END_OF_STREAM = new Uint8Array([0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);

function frame(header, body) {
  const padded = (header.length + 7) & ~7;
  const bytes = new Uint8Array(8 + padded + body.length);
  const view = new DataView(bytes.buffer);
  view.setUint32(0, 0xffffffff, true);
  view.setInt32(4, padded, true);
  bytes.set(header, 8);
  bytes.set(body, 8 + padded);
  return bytes;
}

/** Decodes FlightData one message at a time into record batches. apache-arrow's readers take an IPC stream, so each
 * batch is read as a stream of its own: the schema, the dictionaries so far, the batch. (Its async reader over a
 * stream of messages waits for the next message before it hands over a batch whose body ends a chunk: fine for a
 * whole stream, a deadlock for a session, whose next message comes only after the next lookup is sent.) */
class Decoder {
  constructor() {
    this.prefix = [];
    this.schema = null;
  }

  /** The batch of a FlightData, or null for a schema, a dictionary or app_metadata alone. */
  decode(data) {
    if (data.data_header.length === 0) return null;
    const framed = frame(data.data_header, data.data_body);
    const message = arrow.Message.decode(data.data_header);
    if (message.isSchema()) {
      this.prefix = [framed];
      this.schema = schemaOf(framed);
      return null;
    }
    if (message.isDictionaryBatch()) {
      this.prefix.push(framed);
      return null;
    }
    const reader = arrow.RecordBatchReader.from(Buffer.concat([...this.prefix, framed, END_OF_STREAM]));
    return reader.next().value;
  }
}

/** A table as FlightData: its IPC stream cut into messages (the first is the schema; the end marker is dropped). */
function flightData(table) {
  const bytes = arrow.tableToIPC(table, 'stream');
  const messages = [];
  for (let at = 0; ;) {
    const length = new DataView(bytes.buffer, bytes.byteOffset + at).getInt32(4, true);
    if (length === 0) return messages;
    const header = bytes.subarray(at + 8, at + 8 + length);
    const bodyLength = Number(arrow.Message.decode(header).bodyLength);
    const body = bytes.subarray(at + 8 + length, at + 8 + length + bodyLength);
    messages.push({ data_header: Buffer.from(header), data_body: Buffer.from(body) });
    at += 8 + length + bodyLength;
  }
}

/** A schema in the IPC form of FlightInfo.schema and SchemaResult.schema. */
function schemaOf(bytes) {
  const reader = arrow.RecordBatchReader.from(Buffer.concat([bytes, END_OF_STREAM]));
  reader.open();
  return reader.schema;
}

async function readTable(call) {
  const decoder = new Decoder();
  const batches = [];
  for await (const data of call) {
    const batch = decoder.decode(data);
    if (batch) batches.push(batch);
  }
  if (!decoder.schema) throw new Error('the stream ended without a schema');
  return new arrow.Table(decoder.schema, batches);
}

/** Writes a message, waiting while gRPC's buffer is full (the server's answers are read meanwhile). */
async function send(call, message) {
  if (!call.write(message)) await once(call, 'drain');
}

// ---------------------------------------------------------------------------------------------------------------
// Entity rows built in JavaScript: {"column": {"type": "int64" | "utf8" | "dictionary" | "float64" | "timestamp" | "null",
// "values": [...]}}. Timestamps are ISO-8601 with an offset, sent as milliseconds since the epoch in UTC.

const TYPES = {
  int64: [() => new arrow.Int64(), (v) => BigInt(v)],
  utf8: [() => new arrow.Utf8(), (v) => v],
  dictionary: [() => new arrow.Dictionary(new arrow.Utf8(), new arrow.Int32()), (v) => v], // JS's inferred strings
  float64: [() => new arrow.Float64(), (v) => v],
  timestamp: [() => new arrow.TimestampMillisecond('UTC'), (v) => Date.parse(v)],
  null: [() => new arrow.Null(), (v) => v],
};

function tableOf(columns) {
  const vectors = {};
  for (const [name, { type, values }] of Object.entries(columns)) {
    const [make, convert] = TYPES[type];
    vectors[name] = arrow.vectorFromArray(values.map((v) => (v === null ? null : convert(v))), make());
  }
  return new arrow.Table(vectors);
}

function batchesOf(table, count) {
  const size = Math.ceil(table.numRows / count);
  return Array.from({ length: count }, (_, i) => table.slice(i * size, Math.min((i + 1) * size, table.numRows)));
}

// ---------------------------------------------------------------------------------------------------------------

// A batch of 128K rows may pass gRPC's default limit on a received message, 4 MiB: none, as in Arrow's clients.
let maxReceiveBytes = -1;

function channel(location) {
  const url = new URL(location); // grpc://host:port, grpc+tls://host:port
  const credentials = url.protocol === 'grpc+tls:' ? grpc.credentials.createSsl() : grpc.credentials.createInsecure();
  return new FlightService(url.host, credentials, { 'grpc.max_receive_message_length': maxReceiveBytes });
}

export class FeatureClient {
  constructor(location, token = null) {
    this.location = location;
    this.token = token;
    this.channels = new Map();
  }

  service(location = this.location) {
    if (!this.channels.has(location)) this.channels.set(location, channel(location));
    return this.channels.get(location);
  }

  close() {
    for (const service of this.channels.values()) service.close();
  }

  metadata(headers = {}) {
    const metadata = new grpc.Metadata();
    if (this.token) metadata.set('authorization', `Bearer ${this.token}`);
    for (const [name, value] of Object.entries(headers)) metadata.set(name, value);
    return metadata;
  }

  unary(method, request, location) {
    return new Promise((resolve, reject) => {
      this.service(location)[method](request, this.metadata(), (error, reply) => (error ? reject(error) : resolve(reply)));
    });
  }

  async collect(call) {
    const messages = [];
    for await (const message of call) messages.push(message);
    return messages;
  }

  /** Flight's handshake with basic credentials: the server answers with the header `authorization: Bearer ...`. */
  async login(name, password) {
    const metadata = new grpc.Metadata();
    metadata.set('authorization', `Basic ${Buffer.from(`${name}:${password}`).toString('base64')}`);
    const call = this.service().Handshake(metadata);
    const headers = once(call, 'metadata');
    call.end();
    await this.collect(call);
    const [answered] = await headers;
    const [bearer] = answered.get('authorization');
    this.token = String(bearer).replace(/^Bearer /, '');
    return this.token;
  }

  async action(type, body = null) {
    const call = this.service().DoAction({ type, body: body === null ? Buffer.alloc(0) : utf8(body) }, this.metadata());
    return (await this.collect(call)).map((result) => parseJson(result.body.toString()));
  }

  async listActions() {
    return (await this.collect(this.service().ListActions({}, this.metadata()))).map(({ type, description }) => ({
      type, description,
    }));
  }

  async listFlights(criteria = '') {
    return this.collect(this.service().ListFlights({ expression: utf8(criteria) }, this.metadata()));
  }

  /** do_get of a ticket: a JSON request (scan, historical with entities, online with keys) or an endpoint's. */
  async get(ticket, location) {
    return readTable(this.service(location).DoGet({ ticket: Buffer.isBuffer(ticket) ? ticket : utf8(ticket) }, this.metadata()));
  }

  flightInfo(descriptor) {
    return this.unary('GetFlightInfo', descriptor);
  }

  async getSchema(descriptor) {
    return schemaOf((await this.unary('GetSchema', descriptor)).schema);
  }

  /** Every endpoint of a FlightInfo, each at its first location that answers (none: this server). */
  async readEndpoints(info) {
    const parts = [];
    for (const endpoint of info.endpoint) {
      const locations = endpoint.location.map((l) => l.uri);
      for (const [i, location] of (locations.length ? locations : [this.location]).entries()) {
        try {
          parts.push(await this.get(endpoint.ticket.ticket, location));
          break;
        } catch (error) {
          if (error.code !== grpc.status.UNAVAILABLE || i === locations.length - 1) throw error;
        }
      }
    }
    const schema = schemaOf(info.schema);
    return new arrow.Table(parts.length ? parts[0].schema : schema, parts.flatMap((t) => t.batches));
  }

  /** A do_exchange of entity rows (training set) or keys (online lookup): one answer batch per batch written, read
   * while writing. */
  async exchange(request, batches, headers = {}) {
    const call = this.service().DoExchange(this.metadata(headers));
    const answer = readTable(call);
    answer.catch(() => {}); // its error is awaited below
    const descriptor = { type: 'CMD', cmd: utf8(request) };
    for (const [i, batch] of batches.entries()) {
      const messages = flightData(batch);
      for (const [j, message] of (i === 0 ? messages : messages.slice(1)).entries()) {
        await send(call, i === 0 && j === 0 ? { ...message, flight_descriptor: descriptor } : message);
      }
    }
    call.end();
    return answer;
  }

  /** An online session (protocol.md "Sessions"): one do_exchange, one batch of keys written and its answer read per
   * lookup. All lookups share the first one's schema (an IPC stream has one). */
  async session(request, lookups) {
    const call = this.service().DoExchange(this.metadata({ 'x-online-session': '1' }));
    const incoming = call[Symbol.asyncIterator]();
    const decoder = new Decoder();
    const answers = [];
    for (const [i, keys] of lookups.entries()) {
      const messages = flightData(keys);
      const sent = i === 0 ? [{ ...messages[0], flight_descriptor: { type: 'CMD', cmd: utf8(request) } }, ...messages.slice(1)]
        : messages.slice(1);
      for (const message of sent) await send(call, message);
      for (;;) {
        const { value, done } = await incoming.next();
        if (done) throw new Error('the session ended before its answer');
        const batch = decoder.decode(value);
        if (batch) {
          answers.push(new arrow.Table(decoder.schema, [batch]));
          break;
        }
      }
    }
    call.end();
    for (let next = await incoming.next(); !next.done; next = await incoming.next()) {
      if (decoder.decode(next.value)) throw new Error('a session answered more batches than it was sent');
    }
    return answers;
  }

  /** do_put of a table, with the end-of-stream marker; the reply comes once the call is closed. */
  async put(command, table) {
    const call = this.service().DoPut(this.metadata());
    const replies = this.collect(call);
    replies.catch(() => {});
    const messages = flightData(table);
    messages[0].flight_descriptor = { type: 'CMD', cmd: utf8({ ...command, end_marker: true }) };
    for (const message of messages) await send(call, message);
    await send(call, { app_metadata: utf8({ end_of_stream: true, rows: table.numRows }) });
    call.end();
    const [reply] = await replies;
    return parseJson(reply.app_metadata.toString());
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Errors (protocol.md "Errors"): the status, the explanation (the message cut at ". Detail: "), and the detail JSON of
// kinds that share a status, raw bytes in the trailer grpc-status-details-bin.

export function error(failure) {
  if (typeof failure.code !== 'number') return { status: null, message: String(failure.message ?? failure) }; // not a call's
  const status = Object.keys(grpc.status).find((name) => grpc.status[name] === failure.code);
  const trailers = failure.metadata ?? new grpc.Metadata();
  const [detail] = trailers.get('grpc-status-details-bin');
  const [explanation] = trailers.get('x-arrow-status-message-bin');
  return {
    status,
    message: failure.details.split('. Detail: ')[0],
    detail: detail ? detail.toString() : '',
    kind: detail ? parseJson(detail.toString()).code : status,
    trailer_message: explanation ? explanation.toString() : null,
  };
}

function write(path, table) {
  writeFileSync(path, arrow.tableToIPC(table, 'file'));
  return { rows: table.numRows, metadata: table.schema.metadata };
}

const descriptorOf = (step) => (step.path ? { type: 'PATH', path: step.path } : { type: 'CMD', cmd: utf8(step.request) });

const STEPS = {
  list_actions: async (client) => ({ actions: await client.listActions() }),
  action: async (client, step) => ({ result: await client.action(step.type, step.body ?? null) }),
  login: async (client, step) => ({ token: await client.login(step.name, step.password) }),
  list_flights: async (client, step) => ({
    flights: (await client.listFlights(step.criteria ?? '')).map((info) => ({
      path: info.flight_descriptor.path,
      total_records: Number(info.total_records),
      app_metadata: parseJson(info.app_metadata.toString()),
      columns: schemaOf(info.schema).fields.map((f) => f.name),
      tickets: info.endpoint.map((e) => parseJson(e.ticket.ticket.toString())),
      locations: info.endpoint.map((e) => e.location.map((l) => l.uri)),
    })),
  }),
  get: async (client, step) => write(step.out, await client.get(step.request)),
  read: async (client, step) => {
    const info = await client.flightInfo(descriptorOf(step));
    const table = await client.readEndpoints(info);
    const schema = await client.getSchema(descriptorOf(step));
    return {
      ...write(step.out, table),
      endpoints: info.endpoint.length,
      total_records: Number(info.total_records),
      app_metadata: parseJson(info.app_metadata.toString()),
      info_metadata: schemaOf(info.schema).metadata,
      get_schema: { columns: schema.fields.map((f) => `${f.name}: ${f.type}`), metadata: schema.metadata },
    };
  },
  exchange: async (client, step) => {
    const table = tableOf(step.rows);
    return write(step.out, await client.exchange(step.request, batchesOf(table, step.batches ?? 1), step.headers));
  },
  session: async (client, step) => {
    const answers = await client.session(step.request, step.lookups.map(tableOf));
    return { answers: answers.map((table, i) => write(`${step.out}.${i}`, table)) };
  },
  put: async (client, step) => ({ reply: await client.put(step.command, tableOf(step.rows)) }),
};

async function main([location, planFile]) {
  const plan = parseJson(readFileSync(planFile, 'utf8'));
  maxReceiveBytes = plan.max_receive_bytes ?? -1;
  const client = new FeatureClient(location, plan.token ?? null); // a login step changes its token
  let failed = false;
  for (const step of plan.steps) {
    const caller = 'token' in step ? new FeatureClient(location, step.token) : client;
    try {
      console.log(stringify(await STEPS[step.op](caller, step)));
    } catch (failure) {
      console.log(stringify({ error: error(failure) }));
      failed = true;
    } finally {
      if (caller !== client) caller.close();
    }
  }
  client.close();
  process.exitCode = failed ? 1 : 0;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) await main(process.argv.slice(2));
