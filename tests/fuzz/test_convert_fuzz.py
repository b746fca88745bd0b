"""Property-based fuzzing of the HL7 v2 → FHIR conversion (bounded for CI).

Contract (transforms/convert.py): a conversion gives a Bundle, a located ``ConversionError`` (content
the sender must fix) or a located ``MessageRejected`` (unsupported type or trigger).  Its safety net
turns any other exception into ``InternalConversionError`` (AR 207, chained to the original): that is
a converter bug, and both properties fail on it: the first through ``convert_report`` (what the
engine calls), the second through ``_convert`` (no safety net, so the failure shows the original
traceback).  ``SLUICE_FUZZ_EXAMPLES=20000`` runs them longer.

Inputs: synthetic ADT (incl. merges, moves, changes, links, A17, A20, IAM)/ORU/SIU/VXU/MDM/ORM/OML/OMG/OUL/REF/
RDE/RDS/OMP/PPR/DFT/BAR messages (no real PHI) with field-aware mutations: a random field,
component or repetition replaced by odd values (impossible dates, offsets, huge numbers, escapes,
delimiter runs, unicode), segments dropped or duplicated.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine import exactjson, hl7
from engine.errors import ConversionError, InternalConversionError, MessageRejected, SluiceError
from transforms.convert import _convert, convert_report
from transforms.settings import ConvertSettings

ROOT = Path(__file__).resolve().parents[2]
FUZZ = settings(
    max_examples=int(os.environ.get("SLUICE_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

SETTINGS = [
    ConvertSettings(derive_unknown_systems=True, site_tz="America/Chicago"),
    ConvertSettings(
        identifier_systems={"NORTH": "urn:oid:2.16.840.1.113883.3.999.1"},
        unknown_prior_patient="accept",
        cancel_before_book="error",
        code_table_errors="reject",
        unmapped_codes="reject",
    ),
    ConvertSettings(
        default_identifier_system="urn:oid:1.2.3", date_format="%m/%d/%Y %H:%M", note_max_length=5
    ),
]

H = "MSH|^~\\&|EHR|NORTH|SL|HOSP|20250314083000||{t}|C{n}|P|2.5.1\r"
CORPUS: list[str] = [
    H.format(t="ADT^A01^ADT_A01", n=1) + "EVN|A01|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR~999-99-9999^^^USA^SS||Testpatient^Alex^Q^^Dr||19800101|F|||"
    "1 Example Way^^Springfield^OR^97477^USA||^PRN^PH^^1^541^5550100|||M||ACC1|||||N\r"
    "NK1|1|Testkin^Sam|SPO\r"
    "PV1|1|I|4N^401^A^NORTH||||1234567893^Carer^Casey^^^Dr^^^NPI|||MED||||||||V1^^^NORTH^VN|||||||||||||||||||||||||"
    "20250314082500|20250315100000\r"
    "AL1|1|DA|PCN^Penicillin^L|SV|Hives\r"
    "DG1|1||I10^Hypertension^I10||20250314|A\r"
    "IN1|1|PLAN1|INS1^^^NORTH|Example Insurance|||GRP1||||||||Testpatient^Alex|SEL|19800101\r",
    H.format(t="ADT^A40^ADT_A39", n=2) + "EVN|A40|20250314083000\r"
    "PID|1||NEW1^^^NORTH^MR||Testpatient^Alex||19800101|F\rMRG|OLD1^^^NORTH^MR||||||Oldname^Alex\r",
    H.format(t="ADT^A08^ADT_A01", n=3) + "EVN|A08|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||198001011230-0500|M|||||||||||||||||||||20250101\r"
    "PV1|1|E|ED^^^NORTH|||||||||||||||V2^^^NORTH^VN\r",
    H.format(t="ORU^R01^ORU_R01", n=4) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
    "ORC|RE|ORD1^NORTH|FIL1^NORTH\r"
    "OBR|1|ORD1^NORTH|FIL1^NORTH|24331-1^Lipid panel^LN|||20250314090000|||||||||||||||20250314101000|||F\r"
    "OBX|1|NM|2093-3^Cholesterol^LN||182|mg/dL^mg/dL^UCUM|<200|H|||F|||20250314100000\r"
    "OBX|2|ST|8251-1^Note^LN||text \\.br\\ more||||||C\r"
    "OBX|3|CWE|LA6576-8^Positive^LN||POS^Positive^L||||||P\r"
    "OBX|4|SN|777-3^Platelets^LN||>^150|10*3/uL|||||F\r"
    "OBX|5|ED|PDF^Report^L||LAB^AP^PDF^Base64^JVBERi0xLjQK||||||F\r"
    "NTE|1||Fasting sample.\r",
    H.format(t="SIU^S12^SIU_S12", n=5)
    + "SCH|APT1^NORTH|APT1^NORTH|||||ROUTINE^Routine|FOLLOWUP|30|MIN|^^30^20250320093000^20250320100000|||||||||||||||Booked\r"
    "TQ1|1||||||20250320093000|20250320100000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\rRGS|1|A\r"
    "AIS|1|A|99213^Office visit^CPT|20250320093000|||30|MIN\r"
    "AIP|1|A|1234567893^Carer^Casey^^^Dr^^^NPI|ATTENDING||20250320093000|||30|MIN\r"
    "AIL|1|A|EXAM2^^^NORTH|||20250320093000|||30|MIN\r",
    H.format(t="SIU^S15^SIU_S12", n=6)
    + "SCH|APT2^NORTH|APT2^NORTH|||||||30|MIN|^^30^20250320093000|||||||||||||||Cancelled\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r",
    H.format(t="VXU^V04^VXU_V04", n=7) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||20200101|F\r"
    "NK1|1|Testkin^Sam|MTH\rORC|RE|PIZ1^NORTH|FIZ1^NORTH|||||||||1234567893^Carer^Casey^^^Dr^^^NPI\r"
    "RXA|0|1|20250314090000||08^Hep B^CVX|0.5|mL^mL^UCUM||00^New^NIP001|1234567893^Carer^Casey^^^Dr^^^NPI|"
    "^^^NORTH||||LOT1|20261231|MSD^Merck^MVX|||CP|A|20250314091000\r"
    "RXR|C28161^Intramuscular^NCIT|LA^Left Arm^HL70163\r"
    "OBX|1|CE|64994-7^Eligibility^LN|1|V02^Medicaid^HL70064||||||F|||20250314\r"
    "OBX|2|CE|30963-3^Funding^LN|2|VXC1^Federal^CDCPHINVS||||||F\r"
    "OBX|3|TS|29769-7^VIS presented^LN|3|20250314||||||F\r",
    H.format(t="MDM^T02^MDM_T02", n=8) + "EVN|T02|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
    "PV1|1|I|4N^401^A^NORTH|||||||MED|||||||||V1^^^NORTH^VN\r"
    "TXA|1|DS^Discharge summary^HL70270|TX|20250314083000||20250314084000|||1234567893^Carer^Casey^^^Dr^^^NPI|||"
    "DOC1^NORTH|DOC0^NORTH||||AU||AV||||||Summary\r"
    "OBX|1|TX|18842-5^Discharge summary^LN|1|Line one||||||F\r"
    "OBX|2|ED|18842-5^Discharge summary^LN|2|^application^pdf^Base64^JVBERi0xLjQK||||||F\r",
    H.format(t="MDM^T11^MDM_T01", n=9) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r"
    "TXA|1|DS|TX|||||||||DOC1^NORTH|||||LA||CA\r",
    H.format(t="ORM^O01^ORM_O01", n=10) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
    "PV1|1|O|CLIN^^^NORTH|||||||||||||||||V1^^^NORTH^VN\rAL1|1|DA|PCN^Penicillin^L|SV|Hives\r"
    "ORC|NW|ORD1^NORTH|FIL1^NORTH|GRP1^NORTH|SC||1^BID^^20250314090000^20250320090000^R||20250314083000|||"
    "1234567893^Carer^Casey^^^Dr^^^NPI|||||||||NORTH CLINIC|1 Example Way^^Springfield|||||||O\r"
    "OBR|1|ORD1^NORTH|FIL1^NORTH|24331-1^Lipid panel^LN|R|20250314090000||||||||||1234567893^Carer^Casey^^^Dr^^^NPI|"
    "||||||||||||PAR1&NORTH^PARF1&NORTH|||I10^Hypertension^I10\rNTE|1||Fasting.\r"
    "DG1|1||I10^Hypertension^I10||20250314|W\rOBX|1|NM|3141-9^Weight^LN||72.5|kg^kg^UCUM|||||F\r",
    H.format(t="ORM^O01^ORM_O01", n=11) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r"
    "ORC|CA|ORD1^NORTH|FIL1^NORTH||CA\rOBR|1|ORD1^NORTH||24331-1^Lipid panel^LN\r",
    H.format(t="OML^O21^OML_O21", n=12) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
    "ORC|NW|ORD2^NORTH|||||||20250314083000\rTQ1|1||Once||||20250314090000|20250314100000|S\r"
    "OBR|1|ORD2^NORTH||2345-7^Glucose^LN|||20250314090000\r"
    "SPM|1|SP1&NORTH^SF1&NORTH|SP0&NORTH|119364003^Serum^SCT|||VENIP^Venipuncture^HL70488|LACF^Arm^HL70163|||"
    "|5^mL&mL&UCUM||Clear||||20250314090500|20250314093000||Y||||ROOM^Room^HL70493|||SST^Tube^HL70378|||ACC1^NORTH\r"
    "OBX|1|NM|8310-5^Temp^LN||37.1|Cel^Cel^UCUM|||||F\r",
    H.format(t="OMG^O19^OMG_O19", n=13) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r"
    "ORC|XO|ORD3^NORTH|||HD\rOBR|1|ORD3^NORTH||24627-2^Chest CT^LN\rOBR|2|ORD3^NORTH||71250^CT^C4\r",
    H.format(t="OUL^R22^OUL_R22", n=14) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
    "SPM|1|SP1&NORTH^SF1&NORTH||119364003^Serum^SCT|||||||||||||20250314090500\r"
    "OBX|1|CWE|33882-2^Appearance^LN||CLEAR^Clear^L||||||F\r"
    "OBR|1|ORD2^NORTH|FIL2^NORTH|2345-7^Glucose^LN|||20250314090500||||||||||||||20250314110000|||F\r"
    "ORC|SC|ORD2^NORTH|FIL2^NORTH||CM\rOBX|1|NM|2345-7^Glucose^LN||95|mg/dL|70-99|N|||F\rNTE|1||Fasting\r",
    H.format(t="OML^O33^OML_O33", n=35) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
    "SPM|1|SP1&NORTH^SF1&NORTH||119364003^Serum^SCT\rOBX|1|CWE|33882-2^Appearance^LN||CLEAR^Clear^L||||||F\r"
    "SAC|||CT1^NORTH\rORC|NW|ORD5^NORTH|||||||20250314083000\rOBR|1|ORD5^NORTH||2345-7^Glucose^LN\r"
    "ORC|NW|ORD6^NORTH\rOBR|1|ORD6^NORTH||2951-2^Sodium^LN\rSPM|2|SP2&NORTH||119297000^Blood^SCT\r"
    "ORC|NW|ORD7^NORTH\rOBR|1|ORD7^NORTH||718-7^Hemoglobin^LN\r",
    H.format(t="OUL^R24^OUL_R24", n=33) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
    "OBR|1|ORD2^NORTH|FIL2^NORTH|2345-7^Glucose^LN|||20250314090500||||||||||||||20250314110000|||F\r"
    "ORC|SC|ORD2^NORTH|FIL2^NORTH||CM\rSPM|1|SP1&NORTH^SF1&NORTH||119364003^Serum^SCT\r"
    "OBX|1|CWE|33882-2^Appearance^LN||CLEAR^Clear^L||||||F\rSAC|||CT1^NORTH\r"
    "OBX|1|NM|2345-7^Glucose^LN||95|mg/dL|70-99|N|||F\rNTE|1||Fasting\r",
    H.format(t="REF^I12^REF_I12", n=15)
    + "RF1|P^Pending^HL70283|R|Med^Medical^HL70281||O|RF1^NORTH|20250314|20250614||S^Second opinion^HL70336|EXT1^SPEC\r"
    "PRD|RP|Carer^Casey^^^Dr|1 Example Way^^Springfield||^WPN^PH^^1^541^5550100||1234567893^NPI\r"
    "PRD|RT|Special^Sam|2 Oak St^^Springfield||||SP22^LI\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\rDG1|1||R51^Headache^I10\rNTE|1||Soon please\r",
    H.format(t="REF^I14^REF_I12", n=16)
    + "RF1|A|R|Med||O|RF1^NORTH\rPID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r",
    H.format(t="RDE^O11^RDE_O11", n=17) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
    "PV1|1|I|4N^401^A^NORTH|||||||MED|||||||||V1^^^NORTH^VN\r"
    "ORC|NW|RX1^NORTH|PH1^NORTH||IP||^Q8H^^20250314090000||20250314083000|||1234567893^Carer^Casey^^^Dr^^^NPI\r"
    "TQ1|1||Q8H||||20250314090000|20250321090000\r"
    "RXE|^Q8H|308182^Amoxicillin 500 MG^RXNORM|500|1000|mg^mg^UCUM|CAP^Capsule^HL70292|^Take with food||G|21|"
    "{capsule}^capsule^UCUM|2|||RXN1||||||||125|mL/h^mL/h^UCUM|||J02.9^Pharyngitis^I10||||||20250314080000\r"
    "NTE|1||Full course.\rRXR|PO^Oral^HL70162|LA^Left Arm^HL70163||IVP^IV push^HL70165\r"
    "RXC|B|313002^Saline^RXNORM|1000|mL^mL^UCUM\rRXC|A|8591^KCl^RXNORM|20|meq^meq^UCUM\r",
    H.format(t="RDE^O11^RDE_O11", n=18) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r"
    "ORC|DC|RX1^NORTH||||||||20250316083000\rRXE||308182^Amoxicillin 500 MG^RXNORM|500||mg\r",
    H.format(t="OMP^O09^OMP_O09", n=34) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r"
    "ORC|NW|RX2^NORTH||||||||20250316083000\rTQ1|1||BID\rRXO|308182^Amoxicillin^RXNORM|500||mg|||^With food\r"
    "RXR|PO\rRXC|A|308182^Amoxicillin^RXNORM|500|mg\rNTE|1||Allergy checked.\r",
    H.format(t="RDS^O13^RDS_O13", n=19) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r"
    "ORC|RE|RX1^NORTH|PH1^NORTH\rRXE||308182^Amoxicillin^RXNORM|500||mg\rRXR|PO\r"
    "RXD|1|308182^Amoxicillin^RXNORM|20250314093000|21|{capsule}|CAP|RXN1|||1234567893^Pharm^Pam^^^^^^NORTH|N\r"
    "NTE|1||Counselled.\rRXD|2|308182^Amoxicillin^RXNORM|20250321093000|21\r",
    H.format(t="PPR^PC1^PPR_PC1", n=20) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F\r"
    "PV1|1|O|CLIN^^^NORTH||||||||||||||||V1^^^NORTH^VN\r"
    "PRB|AD|20250314083000|44054006^Diabetes^SCT|PRB1^NORTH||1|20250314|20260101|20250601|CL^Chronic^L|||C|A|20250314|"
    "20240101|onset text||||||||||SEV^Severe^L\rNTE|1||Counselling.\r"
    "GOL|AD|20250314|A1C^A1c below 7^L|GOL1^NORTH||1|20250314|20251001|CAT^Cat^L|||||||||A|20250314\r"
    "NTE|1||Review.\rOBX|1|NM|4548-4^A1c^LN||8.1|%|||||F\r",
    H.format(t="PPR^PC3^PPR_PC1", n=21) + "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r"
    "PRB|DE|20250315|44054006^Diabetes^SCT\rGOL|DE|20250315|A1C^A1c below 7^L\r",
    H.format(t="DFT^P03^DFT_P03", n=22) + "EVN|P03|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex||19800101|F||||||||||ACC1^^^NORTH^AN\r"
    "PV1|1|O|CLIN^^^NORTH||||||||||||||||V1^^^NORTH^VN\r"
    "ORC|RE|ORD1^NORTH|FIL1^NORTH||CM\rOBR|1|ORD1^NORTH|FIL1^NORTH|24331-1^Lipid panel^LN|||20250314090000\r"
    "OBX|1|NM|2093-3^Cholesterol^LN||182|mg/dL|||||F\r"
    "FT1|1|TXN1||20250314090000^20250314100000|20250314110000|CG|99213^Visit^C4|||2|120.50&USD|||||||"
    "|R51^Headache^I10|1234567893^Carer^Casey^^^Dr^^^NPI||||||99213^Visit^C4||||00009-0181-01^Dexa^NDC\r"
    "NTE|1||Level 3.\rPR1|1||36415^Venipuncture^C4||20250314094500|||||||||||||PROC1^NORTH\r"
    "FT1|2|||20250314|20250314|CG|626.2|||1\rDG1|1||R51^Headache^I10|||F\r"
    "IN1|1|PLAN1|INS1^^^NORTH|Example Insurance|||GRP1||||||||Testpatient^Alex|SEL|19800101\rIN2|EI1|123\r",
    H.format(t="BAR^P12^BAR_P12", n=23) + "EVN|P12|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex|||||||||||||ACC1^^^NORTH^AN\rPV1|1|O|||||||||||||||||V1^^^NORTH^VN\r"
    "DG1|1||J45^Asthma^I10|||A|||||||||||||||D\rPR1|1||94010^Spirometry^C4||20250314091500|||||||||||||||D\r",
    H.format(t="BAR^P02^BAR_P02", n=24) + "EVN|P02|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex|||||||||||||ACC1^^^NORTH^AN\rPV1|1|O\r"
    "PID|2||MRN2^^^NORTH^MR||Testpatient^Bo|||||||||||||ACC2^^^NORTH^AN\r",
    H.format(t="ADT^A47^ADT_A30", n=25) + "EVN|A47|20250314083000\r"
    "PID|1||NEW1^^^NORTH^MR||Testpatient^Alex||19800101|F\rMRG|OLD1^^^NORTH^MR\r",
    H.format(t="ADT^A41^ADT_A39", n=26) + "EVN|A41|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex|||||||||||||ACC2^^^NORTH^AN\rMRG|MRN1^^^NORTH^MR||ACC1^^^NORTH^AN\r",
    H.format(t="ADT^A42^ADT_A39", n=27) + "EVN|A42|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\rMRG|MRN1^^^NORTH^MR||||V0^^^NORTH^VN\r"
    "PV1|1|I|4N^401^A^NORTH||||||||||||||||V1^^^NORTH^VN\r",
    H.format(t="ADT^A50^ADT_A50", n=28) + "EVN|A50|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\rMRG|MRN1^^^NORTH^MR||||V0^^^NORTH^VN\r"
    "PV1|1|I|4N^401^A^NORTH||||||||||||||||V1^^^NORTH^VN\r",
    H.format(t="ADT^A24^ADT_A24", n=29) + "EVN|A24|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\rPID|2||MRN2^^^NORTH^MR||Testpatient^Bo\r",
    H.format(t="ADT^A17^ADT_A17", n=30) + "EVN|A17|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\rPV1|1|I|4N^401^A^NORTH||||||||||||||||V1^^^NORTH^VN\r"
    "PID|2||MRN2^^^NORTH^MR||Testpatient^Bo\rPV1|1|I|4N^402^A^NORTH||||||||||||||||V2^^^NORTH^VN\r",
    H.format(t="ADT^A20^ADT_A20", n=31) + "EVN|A20|20250314083000\rNPU|4N^401^A^NORTH|H\r",
    H.format(t="ADT^A60^ADT_A60", n=32) + "EVN|A60|20250314083000\r"
    "PID|1||MRN1^^^NORTH^MR||Testpatient^Alex\r"
    "IAM|1|DA^Drug^HL70127|70618^Penicillin^RXNORM|SV^Severe^HL70128|Hives~Rash|A|ALG1^NORTH||AL||20240101||"
    "20250314||||C\rNTE|1||Observed.\rIAR|271807003^Rash^SCT|MO^Moderate^HL70128||None\r"
    "IAM|2|FA|91935009^Peanut^SCT|MI||D|ALG2^NORTH\r",
]

ODD = [
    "", '""', "20250230", "2025", "202503", "2025031412", "20250314250000", "20250314083000+9999", "20250314083000-0500",
    "20250314083000.1234", "99999999999999999999", "-1", "0", "1e309", "NaN", ">", "<=^5", "^", "^^^", "~", "~~", "&",
    "&&", "\\", "\\X4\\", "\\XZZ\\", "\\Q\\", "\\.br\\", "\\H\\x\\N\\", "Ünïcödé", "\u202e", "\ud7ff", " ", "A" * 300,
    "F", "C", "P", "X", "D", "W", "Y", "Z", "A", "SS", "MR", "NORTH", "urn:oid:1.2", "2.16.840.1", "ISO",
    "Booked", "Cancelled", "Noshow", "Blocked", "MIN", "HR", "S", "D", "WK", "NM", "ST", "CWE", "ED", "SN", "TX",
    "Base64", "A99", "S17", "S26", "V04", "T02", "T06", "T10", "T11", "CP", "RE", "NA", "PA", "AU", "LA", "AV", "OB", "CA",
    "NW", "OC", "DC", "HD", "XO", "SC", "CM", "ER", "O01", "O21", "O19", "R22", "R23", "R24", "O33", "I12", "I14", "BID", "Once",
    "O11", "O25", "O13", "O09", "PC1", "PC2", "PC3", "P01", "P02", "P03", "P06", "P11", "P12", "A17", "A20", "A24", "A29", "A34",
    "A37", "A41", "A42", "A43", "A44", "A45", "A47", "A49", "A50", "AD", "UP", "DE", "OD", "RL", "CG", "G", "N", "AN",
    # numbers past what JSON/orjson carries (64-bit ints, finite floats) and digits int() refuses
    "18446744073709551616", "-9223372036854775809", "1" * 30 + ".5", "9" * 400 + ".0", "2147483648", "²", "١٢",
    # control characters, raw and as escapes (FHIR strings allow none but TAB, LF, CR)
    "\x00", "A\x00B", "\x08", "\x1f", "\t", "\\X00\\", "\\X08\\", "\\X411F42\\", "\\XC2A0\\",
]  # fmt: skip


@st.composite
def mutated(draw: Any) -> str:
    lines = draw(st.sampled_from(CORPUS)).split("\r")
    lines = [ln for ln in lines if ln]
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.integers(0, 9))
        i = draw(st.integers(1, len(lines) - 1)) if len(lines) > 1 else 0
        if op == 0 and len(lines) > 2:
            lines.pop(i)
        elif op == 1:
            lines.insert(i, lines[i])
        else:
            fields = lines[i].split("|")
            if len(fields) < 2:
                continue
            f = draw(st.integers(1, len(fields) + 2))
            while len(fields) <= f:
                fields.append("")
            value = draw(st.one_of(st.sampled_from(ODD), st.text(max_size=12)))
            mode = draw(st.integers(0, 2))
            if mode == 0:
                fields[f] = value
            elif mode == 1:  # one component
                comps = fields[f].split("^")
                c = draw(st.integers(0, len(comps) + 1))
                while len(comps) <= c:
                    comps.append("")
                comps[c] = value
                fields[f] = "^".join(comps)
            else:  # add a repetition
                fields[f] = fields[f] + "~" + value
            lines[i] = "|".join(fields).replace("\r", "").replace("\n", "")
    return "\r".join(lines) + "\r"


def _parse(text: str) -> hl7.Message | None:
    try:
        return hl7.parse(text)
    except SluiceError:
        return None


def expect_located(exc: SluiceError) -> None:
    """Pass for a located content error or rejection; fail (keeping the cause) for anything else."""
    if isinstance(exc, InternalConversionError):
        raise AssertionError(f"converter bug: {exc}") from exc
    assert isinstance(exc, ConversionError | MessageRejected), f"{type(exc).__name__}: {exc}"
    assert exc.location is not None, f"conversion error without a location: {exc}"
    assert exc.hl7_error != "207", f"internal error code without the internal error type: {exc}"


_FHIR_DECIMAL = re.compile(rb"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # FHIR string: no C0 controls but TAB, LF, CR


def check_bundle(bundle: dict[str, Any]) -> None:
    """What the ``hl7-to-fhir`` step needs of a Bundle: it encodes exactly (integers within 64 bits and
    finite floats, which orjson would silently write as null; longer numbers as Decimals written as valid
    FHIR decimals that JSON readers take) and every string is a valid FHIR string."""
    orjson.loads(exactjson.dumps(bundle))
    stack: list[Any] = [bundle]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, float):
            assert math.isfinite(v), f"non-finite decimal {v!r}"
        elif isinstance(v, Decimal):
            assert _FHIR_DECIMAL.fullmatch(exactjson.dumps(v)), f"not a FHIR decimal: {v!r}"
        elif isinstance(v, str):
            assert not _FORBIDDEN.search(v), f"control character in a FHIR string: {v[:60]!r}"


# Regressions the properties found once (issue #12): a number orjson refuses (past 64 bits) or would write as
# null (an infinite float), digits int() refuses, and control characters in FHIR strings.
REGRESSIONS = [
    CORPUS[3].replace("||182|", "||18446744073709551616|"),  # OBX-5 NM past 64 bits
    CORPUS[3].replace("||182|", "||" + "9" * 400 + ".0|"),  # float('inf')
    CORPUS[3].replace("||182|", "||" + "9" * 5000 + "|"),  # int() refuses over 4,300 digits
    CORPUS[3].replace("|<200|", "|1-" + "9" * 30 + "|"),  # OBX-7 reference range bound
    CORPUS[3].replace(">^150", ">^18446744073709551616"),  # SN
    # DG1-15 rank '²': str.isdigit() says yes, int() refuses it
    CORPUS[0].replace("|20250314|A\r", "|20250314|A|||||||||\u00b2\r"),
    CORPUS[0].replace("MRN1", "MR\x00N1").replace("Alex^Q", "\x08^\\X00\\Q"),  # NUL, BS, hex-escaped NUL
    CORPUS[0].replace("Alex^Q", "Alex\\F\\^Q").replace("|", "\x00"),  # NUL field separator: \F\ decodes to it
]


@FUZZ
@given(mutated(), st.sampled_from(range(len(SETTINGS))))
@example(REGRESSIONS[0], 0)
@example(REGRESSIONS[1], 0)
@example(REGRESSIONS[2], 1)
@example(REGRESSIONS[3], 0)
@example(REGRESSIONS[4], 2)
@example(REGRESSIONS[5], 0)
@example(REGRESSIONS[6], 0)
@example(REGRESSIONS[7], 0)
def test_convert_report_gives_a_bundle_or_a_located_error(text: str, which: int) -> None:
    msg = _parse(text)
    if msg is None:
        return
    try:
        result = convert_report(msg, SETTINGS[which])
    except SluiceError as exc:
        expect_located(exc)
    else:
        check_bundle(result.bundle)


@FUZZ
@given(mutated(), st.sampled_from(range(len(SETTINGS))))
def test_mappings_have_no_internal_errors(text: str, which: int) -> None:
    """Without the safety net: any non-SluiceError is a mapping bug (it would surface as AR 207)."""
    msg = _parse(text)
    if msg is None:
        return
    try:
        result = _convert(msg, SETTINGS[which])
    except SluiceError as exc:
        expect_located(exc)
    else:
        check_bundle(result.bundle)


SAFETY_NET_PROBE = """
import json
import transforms.convert as convert_mod
from engine.hl7 import parse
from engine.errors import InternalConversionError
from tests.fuzz.test_convert_fuzz import CORPUS, SETTINGS, expect_located

def boom(msg, settings):
    raise IndexError("list index out of range")

convert_mod._convert = boom  # pure build only: compiled code calls _convert directly
out = {"module": convert_mod.__file__}
try:
    convert_mod.convert_report(parse(CORPUS[0]), SETTINGS[0])
except InternalConversionError as exc:
    out.update(ack=exc.ack_code, code=exc.hl7_error, located=exc.location is not None, text=str(exc),
               cause=type(exc.__cause__).__name__)
    try:
        expect_located(exc)
        out["accepted"] = True
    except AssertionError:
        out["accepted"] = False
print(json.dumps(out))
"""


def test_the_safety_net_is_told_apart_from_a_located_error() -> None:
    """The properties above can fail: a mapping that raises becomes InternalConversionError (AR 207),
    chained to the original, and ``expect_located`` rejects it.  Run on the pure build in a fresh
    interpreter (compiled modules cannot be monkeypatched)."""
    proc = subprocess.run(
        [sys.executable, "-c", SAFETY_NET_PROBE],
        cwd=ROOT,
        env=dict(os.environ, SLUICE_PURE_PYTHON="1"),
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    out = json.loads(proc.stdout)
    assert out["module"].endswith("convert.py")
    assert (out["ack"], out["code"], out["located"], out["cause"]) == ("AR", "207", False, "IndexError")
    assert "internal conversion error (IndexError) converting ADT^A01" in out["text"]
    assert out["accepted"] is False
