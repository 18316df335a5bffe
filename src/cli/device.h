/* --device for the commands that run the model: where it runs. */
#ifndef DT_CLI_DEVICE_H
#define DT_CLI_DEVICE_H

#include "deltatune/qwen35_cuda.h"

/* "auto" (a CUDA GPU when this build has the backend and one is present, else the CPU),
 * "cuda", "cpu"; NULL-terminated, for ARG_CHOICE. */
extern const char *const device_names[];
#define DEVICE_HELP "where the model runs: auto (a CUDA GPU when there is one), cuda, cpu; the default comes from $DELTATUNE_DEVICE when set"
/* $DELTATUNE_DEVICE when it names a device, else "auto". */
const char *device_default(void);

/* Opens the device named by --device for m: *gpu is the GPU model, or NULL for the CPU.
 * Prints which device was chosen to stderr. */
int cli_open_device(const char *name, const qwen35_model *m, qwen35_cuda **gpu);

#endif
