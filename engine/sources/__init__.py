"""Message sources other than the MLLP listener (engine/listener.py): ``fhir-poll`` (fhir_poll.py).

A FHIR resource enters the store as a message of another content type (resources.py): the same
messages table, dedupe, ordering, processing, replay, metrics and console as an HL7 v2 message.
"""
