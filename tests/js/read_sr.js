// Reads an SR the way OHIF does (dcmjs: DicomMessage.readFile, then naturalizeDataset) and
// prints, as JSON, what a TID 1500 viewer looks for: the template identifier, the Imaging
// Measurements container (DCM 126010), its Measurement Groups (DCM 125007) with their NUM,
// CODE, TEXT and IMAGE items, and the other containers at the root.
// Usage: node read_sr.js FILE.dcm   (dcmjs from tests/js/node_modules: npm ci --prefix tests/js)
"use strict";

const fs = require("fs");
const nodePath = require("path");
const dcmjs = require("dcmjs");

// A naturalized sequence is an array; tolerate a lone item or an absent one.
const items = (value) => (value === undefined || value === null ? [] : Array.isArray(value) ? value : [value]);

const code = (coded) => {
  const c = items(coded)[0];
  return c ? { value: c.CodeValue, scheme: c.CodingSchemeDesignator, meaning: c.CodeMeaning } : null;
};

const isCode = (coded, value, scheme) => {
  const c = code(coded);
  return c !== null && c.value === value && c.scheme === scheme;
};

// One content item, flattened to what a viewer shows.
function describe(item) {
  const out = { valueType: item.ValueType, relationship: item.RelationshipType, name: code(item.ConceptNameCodeSequence) };
  if (item.ValueType === "NUM") {
    const measured = items(item.MeasuredValueSequence)[0] || {};
    out.value = Number(measured.NumericValue);
    out.unit = code(measured.MeasurementUnitsCodeSequence);
  } else if (item.ValueType === "CODE") {
    out.value = code(item.ConceptCodeSequence);
  } else if (item.ValueType === "TEXT") {
    out.value = item.TextValue;
  } else if (item.ValueType === "UIDREF") {
    out.value = item.UID;
  } else if (item.ValueType === "IMAGE") {
    const ref = items(item.ReferencedSOPSequence)[0] || {};
    out.value = { sopClassUID: ref.ReferencedSOPClassUID, sopInstanceUID: ref.ReferencedSOPInstanceUID };
  } else if (item.ValueType === "CONTAINER") {
    out.items = items(item.ContentSequence).map(describe);
  }
  return out;
}

const path = process.argv[2];
const buffer = fs.readFileSync(path);
const arrayBuffer = buffer.buffer.slice(buffer.byteOffset, buffer.byteOffset + buffer.byteLength);
const message = dcmjs.data.DicomMessage.readFile(arrayBuffer);
const ds = dcmjs.data.DicomMetaDictionary.naturalizeDataset(message.dict);

const root = items(ds.ContentSequence);
const measurements = root.find((item) => isCode(item.ConceptNameCodeSequence, "126010", "DCM"));
const groups = measurements
  ? items(measurements.ContentSequence).filter((item) => isCode(item.ConceptNameCodeSequence, "125007", "DCM"))
  : [];

const result = {
  // dcmjs exports no package.json; its main script is build/dcmjs.js.
  dcmjsVersion: JSON.parse(fs.readFileSync(nodePath.join(nodePath.dirname(require.resolve("dcmjs")), "..", "package.json"))).version,
  sopClassUID: ds.SOPClassUID,
  templateIdentifier: (items(ds.ContentTemplateSequence)[0] || {}).TemplateIdentifier || null,
  mappingResource: (items(ds.ContentTemplateSequence)[0] || {}).MappingResource || null,
  title: code(ds.ConceptNameCodeSequence),
  codingSchemes: items(ds.CodingSchemeIdentificationSequence).map((s) => s.CodingSchemeDesignator),
  imagingMeasurements: measurements !== undefined,
  measurementGroups: groups.map((group) => items(group.ContentSequence).map(describe)),
  rootContainers: root.filter((item) => item.ValueType === "CONTAINER").map(describe),
};
process.stdout.write(JSON.stringify(result, null, 1) + "\n");
