// Greedy generation with Transformers.js under Node, on a local output folder of onnx-surgery.
// Usage: node tests/js/generate.mjs FOLDER IMAGE PROMPT MAX_NEW_TOKENS [DTYPE]
// Prints one JSON line: {"input_ids": [[...]], "sequences": [[...]]}.
import path from 'node:path';

import {
  AutoProcessor,
  PaliGemmaForConditionalGeneration,
  RawImage,
  env,
} from '@huggingface/transformers';

const [folder, imagePath, prompt, maxNewTokens, dtype = 'fp32'] = process.argv.slice(2);
env.allowRemoteModels = false;
env.localModelPath = path.dirname(path.resolve(folder));
const modelId = path.basename(path.resolve(folder));

const processor = await AutoProcessor.from_pretrained(modelId);
const model = await PaliGemmaForConditionalGeneration.from_pretrained(modelId, {
  dtype,
  device: 'cpu',
});
const image = await RawImage.read(imagePath);
const inputs = await processor(image, prompt);
const output = await model.generate({
  ...inputs,
  max_new_tokens: Number(maxNewTokens),
  do_sample: false,
});
const rows = (tensor) => tensor.tolist().map((row) => row.map(Number));
console.log(JSON.stringify({ input_ids: rows(inputs.input_ids), sequences: rows(output) }));
