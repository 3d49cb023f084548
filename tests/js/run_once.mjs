// Whether one of Transformers.js's ONNX Runtime packages runs a model once on zero inputs.
// Usage: node tests/js/run_once.mjs MODEL PACKAGE NAME=D0,D1,... [NAME=...]
// PACKAGE as in run_model.mjs; every input is float32, of the shape given.
// Prints one JSON line: {"package": PACKAGE, "result": "ok" | "<error message>"}.
import fs from 'node:fs';

const [model, name, ...inputs] = process.argv.slice(2);
let result = 'ok';
try {
  const ort = await import(name);
  if (ort.env.wasm) ort.env.wasm.numThreads = 1;
  const options = name === 'onnxruntime-node' ? {} : { executionProviders: ['wasm'] };
  const session = await ort.InferenceSession.create(fs.readFileSync(model), options);
  const feeds = {};
  for (const input of inputs) {
    const [key, dims] = input.split('=');
    const shape = dims.split(',').map(Number);
    const size = shape.reduce((a, b) => a * b, 1);
    feeds[key] = new ort.Tensor('float32', new Float32Array(size), shape);
  }
  await session.run(feeds);
} catch (error) {
  result = String(error?.message ?? error);
}
console.log(JSON.stringify({ package: name, result }));
process.exit(0); // the wasm builds keep the event loop alive
