#!/usr/bin/env python3
"""Second reference for tests/test_jinja.c: renders (template, context) pairs with Python jinja2 set up
as transformers sets it up (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols,
its tojson and raise_exception, the {% generation %} tag). Same job and output format as render_ref.mjs.
Exit status 3 when jinja2 is not installed (the test then skips this reference)."""
import json
import sys
from datetime import datetime

try:
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
except ImportError:
    sys.exit(3)


class GenerationTag(Extension):
    """transformers' AssistantTracker without the tracking: {% generation %} renders its body."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception
env.globals["strftime_now"] = strftime_now

cache = {}
out = []
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        if not line.strip():
            continue
        job = json.loads(line)
        try:
            t = cache.get(job["template"])
            if t is None:
                with open(job["template"], encoding="utf-8") as tf:
                    t = env.from_string(tf.read())
                cache[job["template"]] = t
            out.append(json.dumps({"ok": True, "out": t.render(**job["context"])}, ensure_ascii=False))
        except Exception as e:  # noqa: BLE001 - any failure is an "error" outcome
            out.append(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}, ensure_ascii=False))
sys.stdout.write("\n".join(out) + "\n")
