// Whether one of Transformers.js's ONNX Runtime packages can create a session for a model.
// Usage: node tests/js/run_model.mjs MODEL PACKAGE
// PACKAGE: onnxruntime-node, onnxruntime-web (its plain wasm build) or onnxruntime-web/webgpu (the
// build Transformers.js's web bundle embeds, used for device wasm as well as webgpu).
// Prints one JSON line: {"package": PACKAGE, "result": "ok" | "<error message>"}.
import fs from 'node:fs';

const [model, name] = process.argv.slice(2);
let result = 'ok';
try {
  const ort = await import(name);
  if (ort.env.wasm) ort.env.wasm.numThreads = 1;
  const options = name === 'onnxruntime-node' ? {} : { executionProviders: ['wasm'] };
  await ort.InferenceSession.create(fs.readFileSync(model), options);
} catch (error) {
  result = String(error?.message ?? error);
}
console.log(JSON.stringify({ package: name, result }));
process.exit(0); // the wasm builds keep the event loop alive
