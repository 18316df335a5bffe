/* deltatune <command> [flags]: finds the command and hands it its own argv. */
#include <stdio.h>
#include <string.h>

#include "cli/args.h"

int cmd_quantize(int argc, char **argv);

#ifndef DELTATUNE_VERSION
#define DELTATUNE_VERSION "0.1.0"
#endif

static const struct {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} commands[] = {
    {"chat", cmd_chat, "talk with a model (and adapter) in the terminal"},
    {"eval", cmd_eval, "loss and perplexity of a model (and adapter) on a JSONL dataset"},
    {"generate", cmd_generate, "generate a reply with a model (and adapter), streamed"},
    {"info", cmd_info, "a model's config, parameters, weights and memory estimate"},
    {"init-model", cmd_init_model, "write a randomly initialised model of a preset size"},
    {"merge", cmd_merge, "fold a LoRA adapter into a standalone checkpoint"},
    {"quantize", cmd_quantize, "write an MLX affine-quantized (8/4-bit) copy of a checkpoint"},
    {"tokenize", cmd_tokenize, "render and tokenize a dataset (any format) and show what trains"},
    {"train", cmd_train, "train a LoRA adapter on a JSONL dataset (PEFT format out)"},
};
#define N_COMMANDS (int)(sizeof commands / sizeof commands[0])

static void usage(FILE *f) {
    fprintf(f, "usage: deltatune <command> [flags]\n"
               "       deltatune --version\n\n"
               "LoRA fine-tuning of Qwen3.5 models on the CPU.\n\ncommands:\n");
    for (int i = 0; i < N_COMMANDS; i++) fprintf(f, "  %-12s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\n\"deltatune <command> --help\" lists the flags of a command.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return EXIT_USAGE;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
        /* "deltatune help eval" is the same as "deltatune eval --help". */
        if (!strcmp(cmd, "help") && argc > 2) {
            for (int i = 0; i < N_COMMANDS; i++)
                if (!strcmp(argv[2], commands[i].name)) {
                    char *sub[] = {argv[2], "--help", NULL};
                    return commands[i].run(2, sub);
                }
            fprintf(stderr, "deltatune: unknown command '%s'\n\n", argv[2]);
            usage(stderr);
            return EXIT_USAGE;
        }
        usage(stdout);
        return EXIT_OK;
    }
    if (!strcmp(cmd, "--version") || !strcmp(cmd, "-V") || !strcmp(cmd, "version")) {
        printf("deltatune %s\n", DELTATUNE_VERSION);
        return EXIT_OK;
    }
    for (int i = 0; i < N_COMMANDS; i++)
        if (!strcmp(cmd, commands[i].name)) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "deltatune: unknown command '%s'\n\n", cmd);
    usage(stderr);
    return EXIT_USAGE;
}
