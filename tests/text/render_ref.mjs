// Reference renderer for tests/test_jinja.c: renders (template, context) pairs with @huggingface/jinja.
// Usage: node render_ref.mjs JOBS.jsonl  — each line {"template": PATH, "context": {...}};
// prints one JSON line per job: {"ok": true, "out": TEXT} or {"ok": false, "error": MESSAGE}.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const require = createRequire(join(here, "../../tools/npm/package.json"));
let Template;
try {
  ({ Template } = require("@huggingface/jinja"));
} catch (e) {
  console.error("render_ref: @huggingface/jinja is missing; run scripts/install-deps.sh (npm ci --prefix tools/npm)");
  process.exit(2);
}

const cache = new Map();
const lines = readFileSync(process.argv[2], "utf8").split("\n").filter((l) => l.length > 0);
const out = [];
for (const line of lines) {
  const job = JSON.parse(line);
  try {
    let t = cache.get(job.template);
    if (!t) {
      t = new Template(readFileSync(job.template, "utf8"));
      cache.set(job.template, t);
    }
    out.push(JSON.stringify({ ok: true, out: t.render(job.context) }));
  } catch (e) {
    out.push(JSON.stringify({ ok: false, error: String(e && e.message ? e.message : e) }));
  }
}
process.stdout.write(out.join("\n") + "\n");
