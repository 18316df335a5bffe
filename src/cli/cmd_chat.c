/* deltatune chat: an interactive conversation in the terminal through the chat template. */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli/args.h"
#include "cli/device.h"
#include "cli/gen_session.h"
#include "deltatune/error.h"

#define CMD "chat"
#define SUMMARY                                                                                         \
    "A conversation with the model (and adapter) in the terminal, rendered with its chat template.\n"   \
    "Type a message and Enter; /reset starts over, /quit (or Ctrl-D) leaves. Ctrl-C stops a reply\n"    \
    "that is being written, or leaves at the prompt. The recurrent and attention caches carry over\n"  \
    "from turn to turn, so only the new part of the conversation is read."

typedef struct {
    const char *model, *adapter, *system, *device;
    bool enable_thinking;
    int max_new, top_k, seed, context;
    double temperature, top_p;
} chat_opts;

static volatile sig_atomic_t interrupted;
static void on_signal(int sig) {
    (void)sig;
    interrupted = 1;
}

/* True when the state has read exactly the first st->n_past of ids. */
static bool extends(const dt_ids *seen, const dt_ids *ids, int64_t n_past) {
    if (seen->n != n_past || ids->n <= n_past) return false;
    return n_past == 0 || memcmp(seen->v, ids->v, sizeof(int32_t) * n_past) == 0;
}

static int turn(gen_session *s, const chat_opts *o, json_t *history, decoder *dec, dt_ids *seen) {
    const qwen35_state *st = &dec->st;
    char *text = NULL;
    size_t len;
    dt_ids ids = {0}, out = {0};
    int rc = chat_render(s->chat, history, NULL, true, o->enable_thinking, &text, &len);
    if (rc == 0) rc = tokenizer_encode(chat_tokenizer(s->chat), text, len, false, &ids);
    free(text);
    if (rc == 0 && ids.n + o->max_new > st->max_len)
        rc = dt_err("the conversation (%d tokens) and a reply would pass --context %lld; /reset to start over", ids.n,
                    (long long)st->max_len);
    if (rc == 0 && !extends(seen, &ids, st->n_past)) {  /* the template rewrote history: read it all again */
        decoder_reset(dec);
        seen->n = 0;
    }
    text_stream ts = {.tok = chat_tokenizer(s->chat), .f = stdout, .stop = s->stop, .n_stop = s->n_stop};
    gen_stats stats;
    if (rc == 0) {
        gen_opts g = {.max_new_tokens = o->max_new, .sampling = {o->temperature, o->top_k, o->top_p},
                      .seed = (uint64_t)o->seed + (uint64_t)seen->n, .stop_ids = s->stop, .n_stop = s->n_stop,
                      .cancel = &interrupted};
        rc = generate(dec, ids.v, ids.n, &g, &out, text_stream_token, &ts, &stats);
        printf("\n");
    }
    if (rc == 0) {  /* what the state has read: the prompt and every reply token but the last */
        seen->n = 0;
        for (int i = 0; i < ids.n && rc == 0; i++) rc = dt_ids_push(seen, ids.v[i]);
        for (int i = 0; i + 1 < out.n && rc == 0; i++) rc = dt_ids_push(seen, out.v[i]);
        char *reply = text_stream_text(&ts);
        json_array_append_new(history, json_pack("{s:s, s:s}", "role", "assistant", "content", reply ? reply : ""));
        free(reply);
    }
    dt_ids_free(&ts.ids);
    dt_ids_free(&ids);
    dt_ids_free(&out);
    return rc;
}

static json_t *new_history(const chat_opts *o) {
    json_t *h = json_array();
    if (o->system) json_array_append_new(h, json_pack("{s:s, s:s}", "role", "system", "content", o->system));
    return h;
}

static int run(const chat_opts *o) {
    gen_session s;
    decoder dec = {0};
    qwen35_cuda *gpu = NULL;
    dt_ids seen = {0};
    json_t *history = NULL;
    int rc = gen_session_open(&s, o->model, o->adapter);
    if (rc == 0 && !s.chat) rc = dt_err("%s has no tokenizer.json: chat needs the tokenizer and its template", o->model);
    if (rc == 0) rc = cli_open_device(o->device, &s.m, &gpu);
    if (rc == 0) rc = decoder_init(&dec, &s.m, gpu, o->context);
    if (rc) {
        decoder_free(&dec);
        qwen35_cuda_free(gpu);
        gen_session_close(&s);
        return cli_fail(CMD, EXIT_RUNTIME);
    }
    /* no SA_RESTART: Ctrl-C at the prompt interrupts the read, and the loop ends cleanly */
    struct sigaction sa = {.sa_handler = on_signal}, old;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, &old);
    history = new_history(o);
    fprintf(stderr, "chat: %s%s%s. /reset starts over, /quit leaves.\n", o->model, o->adapter ? " + " : "",
            o->adapter ? o->adapter : "");
    char line[16384];
    for (;;) {
        interrupted = 0;
        fputs("> ", stdout);
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin)) break;  /* EOF or Ctrl-C */
        line[strcspn(line, "\r\n")] = 0;
        if (!strcmp(line, "/quit") || !strcmp(line, "/exit")) break;
        if (!strcmp(line, "/reset")) {
            json_decref(history);
            history = new_history(o);
            decoder_reset(&dec);
            seen.n = 0;
            fprintf(stderr, "chat: conversation cleared\n");
            continue;
        }
        if (!line[0]) continue;
        json_array_append_new(history, json_pack("{s:s, s:s}", "role", "user", "content", line));
        if (turn(&s, o, history, &dec, &seen)) {
            fprintf(stderr, "deltatune chat: %s\n", dt_errmsg());
            json_array_remove(history, json_array_size(history) - 1);
        }
    }
    printf("\n");
    sigaction(SIGINT, &old, NULL);
    json_decref(history);
    dt_ids_free(&seen);
    decoder_free(&dec);
    qwen35_cuda_free(gpu);
    gen_session_close(&s);
    return EXIT_OK;
}

int cmd_chat(int argc, char **argv) {
    chat_opts o = {.max_new = 512, .top_p = 1.0, .context = 8192, .device = device_default()};
    arg_spec specs[] = {
        ARG_STR_REQ("model", &o.model, "DIR", "model folder (with tokenizer.json and a chat template)"),
        ARG_STR("adapter", &o.adapter, "DIR", "PEFT LoRA adapter to apply"),
        ARG_STR("system", &o.system, "TEXT", "a system message for the conversation"),
        ARG_FLAG("enable-thinking", &o.enable_thinking, "let the template open a <think> block"),
        ARG_INT_RANGE("max-new-tokens", &o.max_new, 1, 1 << 24, "N", "most tokens per reply"),
        ARG_INT_RANGE("context", &o.context, 16, 1 << 24, "N", "tokens the conversation may reach (cache size)"),
        ARG_FLOAT_RANGE("temperature", &o.temperature, 0, 100, "X", "sampling temperature (0: greedy)"),
        ARG_FLOAT_RANGE("top-p", &o.top_p, 0, 1, "P", "nucleus sampling: smallest set with this probability"),
        ARG_INT_RANGE("top-k", &o.top_k, 0, 1 << 24, "N", "sample among the k most likely (0: all)"),
        ARG_INT_RANGE("seed", &o.seed, 0, 2147483647, "N", "sampling seed"),
        ARG_CHOICE("device", &o.device, device_names, DEVICE_HELP),
    };
    int rc = args_parse_command(specs, (int)(sizeof specs / sizeof specs[0]), argc, argv, CMD, SUMMARY);
    if (rc >= 0) return rc;
    return run(&o);
}
