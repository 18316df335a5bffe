// Reference token ids from @lenml/tokenizers (a JavaScript port of Hugging Face tokenizers).
//
//   node tests/text/tokenize_ref.mjs DIR CORPUS.jsonl           one JSON array of ids per corpus line
//   node tests/text/tokenize_ref.mjs DIR CORPUS.jsonl --bench MB  encodes the corpus repeated to about MB
//                                                                  megabytes, prints "ref MB/s: X"
// DIR holds tokenizer.json and (optionally) tokenizer_config.json. Encoding is HF's
// tokenizer.encode(text, add_special_tokens=False): added tokens in the text are matched as tokens,
// nothing is prepended or appended. Corpus lines are {"text": "..."}.
import { readFileSync, existsSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { createRequire } from "node:module";

const [dir, corpusPath, flag, mbArg] = process.argv.slice(2);
if (!dir || !corpusPath) {
  console.error("usage: tokenize_ref.mjs DIR CORPUS.jsonl [--bench MB]");
  process.exit(2);
}
// Resolve the package from tools/npm/node_modules, wherever the script is run from.
const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const require = createRequire(join(root, "tools", "npm", "package.json"));
const { TokenizerLoader } = await import(require.resolve("@lenml/tokenizers"));

const tokenizerJSON = JSON.parse(readFileSync(join(dir, "tokenizer.json"), "utf8"));
const configPath = join(dir, "tokenizer_config.json");
const tokenizerConfig = existsSync(configPath) ? JSON.parse(readFileSync(configPath, "utf8")) : {};
// The chat template is not needed here; tokenizer_class picks Qwen2Tokenizer.
delete tokenizerConfig.chat_template;
const tok = TokenizerLoader.fromPreTrained({ tokenizerJSON, tokenizerConfig });

const texts = readFileSync(corpusPath, "utf8")
  .split("\n")
  .filter((l) => l.length > 0)
  .map((l) => JSON.parse(l).text);

const encode = (t) => (t.length === 0 ? [] : tok.encode(t, { add_special_tokens: false }));

if (flag === "--bench") {
  const target = Number(mbArg || 4) * 1e6;
  const one = texts.join("\n");
  const big = one.repeat(Math.max(1, Math.ceil(target / Buffer.byteLength(one))));
  const bytes = Buffer.byteLength(big);
  // Encode the text in corpus-sized documents, as a data pipeline would.
  const docs = big.split("\n");
  encode(docs.slice(0, 200).join("\n")); // warm-up
  const t0 = process.hrtime.bigint();
  let n = 0;
  for (const d of docs) n += encode(d).length;
  const s = Number(process.hrtime.bigint() - t0) / 1e9;
  console.log(`ref: ${(bytes / 1e6).toFixed(1)} MB, ${n} tokens, ${s.toFixed(2)} s, ${(bytes / 1e6 / s).toFixed(2)} MB/s`);
} else {
  const out = texts.map((t) => JSON.stringify(encode(t))).join("\n");
  process.stdout.write(out + "\n");
}
