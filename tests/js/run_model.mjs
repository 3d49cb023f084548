// Whether one of Transformers.js's ONNX Runtime packages can create a session for a model, and
// optionally what it computes.
// Usage: node tests/js/run_model.mjs MODEL PACKAGE [FEEDS]
// PACKAGE: onnxruntime-node, onnxruntime-web (its plain wasm build) or onnxruntime-web/webgpu (the
// build Transformers.js's web bundle embeds, used for device wasm as well as webgpu).
// FEEDS: a JSON file {name: {type, dims, data}} (type 'float32' or 'int64'); given, the model is
// run on them.
// Prints one JSON line: {"package": PACKAGE, "result": "ok" | "<error message>", "outputs":
// {name: {dims, data}}} (outputs only when FEEDS is given and the run succeeded).
import fs from 'node:fs';

const [model, name, feedsPath] = process.argv.slice(2);
let result = 'ok';
const outputs = {};
try {
  const ort = await import(name);
  if (ort.env.wasm) ort.env.wasm.numThreads = 1;
  const options = name === 'onnxruntime-node' ? {} : { executionProviders: ['wasm'] };
  const session = await ort.InferenceSession.create(fs.readFileSync(model), options);
  if (feedsPath) {
    const feeds = {};
    for (const [input, { type, dims, data }] of Object.entries(JSON.parse(fs.readFileSync(feedsPath)))) {
      const values = type === 'int64' ? BigInt64Array.from(data.map(BigInt)) : Float32Array.from(data);
      feeds[input] = new ort.Tensor(type, values, dims);
    }
    const results = await session.run(feeds);
    for (const [output, tensor] of Object.entries(results)) {
      outputs[output] = { dims: tensor.dims, data: Array.from(tensor.data, Number) };
    }
  }
} catch (error) {
  result = String(error?.message ?? error);
}
console.log(JSON.stringify({ package: name, result, ...(feedsPath && { outputs }) }));
process.exit(0); // the wasm builds keep the event loop alive
