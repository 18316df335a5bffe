#include "cli/device.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deltatune/error.h"

const char *const device_names[] = {"auto", "cuda", "cpu", NULL};

const char *device_default(void) {
    const char *e = getenv("DELTATUNE_DEVICE");
    for (int i = 0; e && device_names[i]; i++)
        if (strcmp(e, device_names[i]) == 0) return device_names[i];
    return "auto";
}

int cli_open_device(const char *name, const qwen35_model *m, qwen35_cuda **gpu) {
    *gpu = NULL;
    bool want = strcmp(name, "cuda") == 0 || (strcmp(name, "auto") == 0 && qwen35_cuda_available());
    if (!want) return 0;
    if (qwen35_cuda_create(gpu, m)) return dt_err_wrap("--device %s", name);
    fprintf(stderr, "device: %s\n", qwen35_cuda_device_name());
    return 0;
}
