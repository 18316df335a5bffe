/* deltatune generate: a prompt through the model's chat template, greedy or sampled, streamed. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli/args.h"
#include "cli/device.h"
#include "cli/gen_session.h"
#include "deltatune/error.h"

#define CMD "generate"
#define SUMMARY                                                                                          \
    "Generates a reply to --prompt, rendered with the model's chat template as a user message with the\n" \
    "generation prompt (--raw: the text as it is; --prompt-ids: token ids). Stops at the model's end\n"   \
    "tokens (<|im_end|>, <|endoftext|>, generation_config.json's eos). Text streams to stdout; with\n"    \
    "--json the last line is {\"ids\": [...], \"text\": \"...\"}. Prefill and decode speed go to stderr."

typedef struct {
    const char *model, *adapter, *prompt, *prompt_ids, *system, *device;
    bool enable_thinking, raw, json;
    int max_new, top_k, seed;
    int quantize, group_size;  /* bits (0: as stored) */
    double temperature, top_p;
} generate_opts;

static volatile sig_atomic_t interrupted;
static void on_signal(int sig) {
    (void)sig;
    interrupted = 1;
}

static int parse_ids(const char *s, int vocab, dt_ids *out) {
    while (*s) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s || v < 0 || v >= vocab)
            return dt_err("--prompt-ids: '%.20s' is not a token id in [0, %d)", s, vocab);
        if (dt_ids_push(out, (int32_t)v)) return dt_err("out of memory");
        s = end;
        while (*s == ',' || *s == ' ') s++;
    }
    return out->n ? 0 : dt_err("--prompt-ids: no ids");
}

/* The prompt's token ids: ids given, raw text, or a chat rendering. */
static int prompt_ids(const gen_session *s, const generate_opts *o, dt_ids *ids) {
    if (o->prompt_ids) return parse_ids(o->prompt_ids, s->ck.cfg.vocab_size, ids);
    if (!s->chat) return dt_err("%s has no tokenizer.json: give the prompt as --prompt-ids", o->model);
    const dt_tokenizer *tok = chat_tokenizer(s->chat);
    if (o->raw) return tokenizer_encode(tok, o->prompt, strlen(o->prompt), false, ids);
    json_t *messages = json_array();
    if (o->system) json_array_append_new(messages, json_pack("{s:s, s:s}", "role", "system", "content", o->system));
    json_array_append_new(messages, json_pack("{s:s, s:s}", "role", "user", "content", o->prompt));
    char *text = NULL;
    size_t len;
    int rc = chat_render(s->chat, messages, NULL, true, o->enable_thinking, &text, &len);
    if (rc == 0) rc = tokenizer_encode(tok, text, len, false, ids);
    free(text);
    json_decref(messages);
    return rc;
}

static int run(const generate_opts *o) {
    gen_session s;
    dt_ids ids = {0}, out = {0};
    decoder dec = {0};
    qwen35_cuda *gpu = NULL;
    int rc = gen_session_open_quantized(&s, o->model, o->adapter, o->quantize, o->group_size, CMD);
    if (rc == 0) rc = prompt_ids(&s, o, &ids);
    int ctx = s.ck.cfg.max_position_embeddings, max_new = o->max_new;
    if (rc == 0 && ids.n >= ctx)
        rc = dt_err("the prompt is %d tokens; the model's context is %d", ids.n, ctx);
    if (rc == 0 && ids.n + max_new > ctx) max_new = ctx - ids.n;
    if (rc == 0) rc = cli_open_device(o->device, &s.m, &gpu);
    if (rc == 0) rc = decoder_init(&dec, &s.m, gpu, ids.n + max_new);
    text_stream ts = {.tok = s.chat ? chat_tokenizer(s.chat) : NULL, .f = stdout, .stop = s.stop, .n_stop = s.n_stop};
    gen_stats stats = {0};
    if (rc == 0) {
        gen_opts g = {.max_new_tokens = max_new, .sampling = {o->temperature, o->top_k, o->top_p},
                      .seed = (uint64_t)o->seed, .stop_ids = s.stop, .n_stop = s.n_stop, .cancel = &interrupted};
        signal(SIGINT, on_signal);
        rc = generate(&dec, ids.v, ids.n, &g, &out, text_stream_token, &ts, &stats);
        signal(SIGINT, SIG_DFL);
        printf("\n");
    }
    if (rc == 0) {
        fprintf(stderr, "generate: prefill %d tokens at %.1f tok/s, decode %d tokens at %.1f tok/s%s\n",
                stats.prompt_tokens, stats.prefill_s > 0 ? stats.prompt_tokens / stats.prefill_s : 0, stats.new_tokens,
                stats.decode_s > 0 ? stats.new_tokens / stats.decode_s : 0,
                stats.stopped ? "" : interrupted ? " (interrupted)" : " (stopped at --max-new-tokens)");
        if (o->json) {
            json_t *j = json_object(), *arr = json_array();
            for (int i = 0; i < out.n; i++) json_array_append_new(arr, json_integer(out.v[i]));
            json_object_set_new(j, "ids", arr);
            char *text = ts.tok ? text_stream_text(&ts) : NULL;
            json_object_set_new(j, "text", text ? json_string(text) : json_null());
            free(text);
            char *line = json_dumps(j, JSON_COMPACT | JSON_ENSURE_ASCII);
            printf("%s\n", line);
            free(line);
            json_decref(j);
        }
    }
    dt_ids_free(&ts.ids);
    dt_ids_free(&ids);
    dt_ids_free(&out);
    decoder_free(&dec);
    qwen35_cuda_free(gpu);
    gen_session_close(&s);
    return rc == 0 ? EXIT_OK : cli_fail(CMD, EXIT_RUNTIME);
}

int cmd_generate(int argc, char **argv) {
    generate_opts o = {.max_new = 256, .top_p = 1.0, .group_size = 64, .device = device_default()};
    arg_spec specs[] = {
        ARG_STR_REQ("model", &o.model, "DIR", "model folder"),
        ARG_STR("adapter", &o.adapter, "DIR", "PEFT LoRA adapter to apply"),
        ARG_STR("prompt", &o.prompt, "TEXT", "the user message"),
        ARG_STR("prompt-ids", &o.prompt_ids, "LIST", "the prompt as comma-separated token ids instead"),
        ARG_STR("system", &o.system, "TEXT", "a system message before the prompt"),
        ARG_FLAG("enable-thinking", &o.enable_thinking, "let the template open a <think> block"),
        ARG_FLAG("raw", &o.raw, "use --prompt as it is, without the chat template"),
        ARG_INT_RANGE("max-new-tokens", &o.max_new, 1, 1 << 24, "N", "most tokens to generate"),
        ARG_FLOAT_RANGE("temperature", &o.temperature, 0, 100, "X", "sampling temperature (0: greedy)"),
        ARG_FLOAT_RANGE("top-p", &o.top_p, 0, 1, "P", "nucleus sampling: smallest set with this probability"),
        ARG_INT_RANGE("top-k", &o.top_k, 0, 1 << 24, "N", "sample among the k most likely (0: all)"),
        ARG_INT_RANGE("seed", &o.seed, 0, 2147483647, "N", "sampling seed"),
        ARG_FLAG("json", &o.json, "end with one JSON line: {\"ids\", \"text\"}"),
        ARG_QUANTIZE(&o.quantize, &o.group_size),
        ARG_CHOICE("device", &o.device, device_names, DEVICE_HELP),
    };
    int rc = args_parse_command(specs, (int)(sizeof specs / sizeof specs[0]), argc, argv, CMD, SUMMARY);
    if (rc >= 0) return rc;
    if (args_check_quantize(o.quantize, o.group_size)) return cli_usage_fail(CMD);
    if (!o.prompt == !o.prompt_ids) {
        dt_err(o.prompt ? "--prompt and --prompt-ids exclude each other" : "missing required flag --prompt (or --prompt-ids)");
        return cli_usage_fail(CMD);
    }
    /* These shape the chat rendering; without it they would be dropped without a word. */
    const char *plain = o.prompt_ids ? "--prompt-ids" : o.raw ? "--raw" : NULL;
    if (o.raw && o.prompt_ids) {
        dt_err("--raw and --prompt-ids exclude each other");
        return cli_usage_fail(CMD);
    }
    if (plain && (o.system || o.enable_thinking)) {
        dt_err("%s needs the chat template, which %s skips", o.system ? "--system" : "--enable-thinking", plain);
        return cli_usage_fail(CMD);
    }
    return run(&o);
}
