/* One include for the BLAS of the platform. */
#ifndef DT_OPS_BLAS_H
#define DT_OPS_BLAS_H
#ifdef DT_ACCELERATE
#include <Accelerate/Accelerate.h>
#else
#include <cblas.h>
#endif
#endif
