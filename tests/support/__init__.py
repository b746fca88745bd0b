"""Real peers for tests: the Medplum FHIR test server, a fault-injecting HTTP proxy."""
