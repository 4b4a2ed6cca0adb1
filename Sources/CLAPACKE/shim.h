// LAPACKE, the C interface of LAPACK (Debian: liblapacke-dev; pkg-config: lapacke).
#include <lapacke.h>
