// An integrator's TypeScript program against the service, with openapi-fetch and the types
// generate.mjs made: upload, wait, generate, download, and typed problems (404, 409, 422).
import { readFileSync } from "node:fs";
import createClient from "openapi-fetch";
import type { components, paths } from "./schema.js";

type Problem = components["schemas"]["Problem"];
type FinetuneForm = components["schemas"]["Body_create_finetune"];

const [baseUrl, key, ...photos] = process.argv.slice(2);
const api = createClient<paths>({ baseUrl, headers: { Authorization: `Bearer ${key}` } });

function expectProblem(error: Problem | undefined, status: number): Problem {
  if (error === undefined || error.status !== status || !error.type.startsWith("urn:tuneqdm:")) {
    throw new Error(`expected a ${status} problem, got ${JSON.stringify(error)}`);
  }
  return error;
}

// Each field as a multipart part: files as they are, params as its JSON text. (A Blob would
// make it a file part, with a file name, which the service does not read as a field.)
function multipart(form: FinetuneForm): FormData {
  const data = new FormData();
  (form.images ?? []).forEach((image, i) => data.append("images", image, `${i}.png`));
  if (form.images_zip) data.append("images_zip", form.images_zip, "photos.zip");
  data.append("instance_prompt", form.instance_prompt);
  if (form.params) {
    data.append("params", JSON.stringify(form.params));
  }
  return data;
}

async function sleep(ms: number): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, ms));
}

const form: FinetuneForm = {
  instance_prompt: "a photo of sks bag",
  images: photos.map((p) => new Blob([readFileSync(p)], { type: "image/png" })),
  params: { steps: 6, resolution: 32 },
};
const created = await api.POST("/v1/finetunes", { body: form, bodySerializer: multipart });
if (!created.data) throw new Error(JSON.stringify(created.error));
const id = created.data.id;

let job = created.data;
for (let i = 0; job.status === "queued" || job.status === "running"; i++) {
  if (i > 480) throw new Error(`still ${job.status}`);
  await sleep(500);
  const got = await api.GET("/v1/finetunes/{finetune_id}", { params: { path: { finetune_id: id } } });
  if (!got.data) throw new Error(JSON.stringify(got.error));
  job = got.data;
}
if (job.status !== "succeeded" || !job.adapter_id) throw new Error(`fine-tune ${job.status}`);

const conflict = await api.POST("/v1/finetunes/{finetune_id}/cancel", {
  params: { path: { finetune_id: id } },
});
expectProblem(conflict.error, 409);
const missing = await api.GET("/v1/adapters/{adapter_id}", {
  params: { path: { adapter_id: "ad_nope" } },
});
expectProblem(missing.error, 404);
const invalid = await api.POST("/v1/generations", { body: { prompt: "x", width: 12000 } });
const fields = (expectProblem(invalid.error, 422).errors ?? []).map((e) => e.field);
if (fields.join() !== "width") throw new Error(`fields at fault: ${fields}`);

const gen = await api.POST("/v1/generations", {
  body: { adapter_id: job.adapter_id, prompt: "a photo of sks bag", steps: 4, seed: 7 },
});
if (!gen.data) throw new Error(JSON.stringify(gen.error));
let generation = gen.data;
for (let i = 0; generation.status === "queued" || generation.status === "running"; i++) {
  if (i > 240) throw new Error(`still ${generation.status}`);
  await sleep(500);
  const got = await api.GET("/v1/generations/{generation_id}", {
    params: { path: { generation_id: generation.id } },
  });
  if (!got.data) throw new Error(JSON.stringify(got.error));
  generation = got.data;
}
const image = await api.GET("/v1/generations/{generation_id}/images/{n}", {
  params: { path: { generation_id: generation.id, n: 0 } },
  parseAs: "blob",
});
if (!image.data) throw new Error(JSON.stringify(image.error));
const bytes = new Uint8Array(await image.data.arrayBuffer());
console.log(JSON.stringify({ finetune: id, generation: generation.id, png_bytes: bytes.length,
  signature: Array.from(bytes.slice(1, 4), (b) => String.fromCharCode(b)).join("") }));
