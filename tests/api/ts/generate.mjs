// Types of the live OpenAPI document, with binary strings (uploads, downloads) as Blob, the
// transform openapi-typescript documents for multipart uploads.
import fs from "node:fs";
import ts from "typescript";
import openapiTS, { astToString } from "openapi-typescript";

const [docPath, outPath] = process.argv.slice(2);
const BLOB = ts.factory.createTypeReferenceNode(ts.factory.createIdentifier("Blob"));
const ast = await openapiTS(JSON.parse(fs.readFileSync(docPath, "utf8")), {
  // A field with a default is optional in a request (the server fills it in).
  defaultNonNullable: false,
  transform(schema) {
    if (schema.format === "binary") return BLOB;
  },
});
fs.writeFileSync(outPath, astToString(ast));
