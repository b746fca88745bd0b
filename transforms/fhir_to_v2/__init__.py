"""FHIR R4 → HL7 v2 (the ``fhir-to-hl7`` step): Appointment → SIU, Patient → ADT A28/A31,
ServiceRequest → ORM^O01.  Pure: the engine decides which candidate message to send from what it last
sent for the resource (``outbound.decide``; the state lives in ``engine/writeback.py``)."""
