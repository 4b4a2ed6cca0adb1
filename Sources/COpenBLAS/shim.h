// CBLAS from OpenBLAS (Debian: libopenblas-dev; pkg-config: openblas).
#include <cblas.h>
// Thread control of OpenBLAS (declared in its cblas.h; repeated here for clarity).
void openblas_set_num_threads(int num_threads);
