// Open MPI's C API (Debian: libopenmpi-dev; pkg-config: ompi-c).
//
// MPI's handles (MPI_COMM_WORLD, MPI_DOUBLE, MPI_SUM, ...) are macros that take the address of
// library globals, which Swift cannot import; these static inline functions return them.
#ifndef NORMKIT_CMPI_SHIM_H
#define NORMKIT_CMPI_SHIM_H
#include <mpi.h>

static inline MPI_Comm normkit_mpi_comm_world(void) { return MPI_COMM_WORLD; }
static inline MPI_Datatype normkit_mpi_float(void) { return MPI_FLOAT; }
static inline MPI_Datatype normkit_mpi_double(void) { return MPI_DOUBLE; }
static inline MPI_Datatype normkit_mpi_int64(void) { return MPI_INT64_T; }
static inline MPI_Datatype normkit_mpi_int(void) { return MPI_INT; }
static inline MPI_Op normkit_mpi_sum(void) { return MPI_SUM; }
static inline MPI_Errhandler normkit_mpi_errors_return(void) { return MPI_ERRORS_RETURN; }
static inline int normkit_mpi_success(void) { return MPI_SUCCESS; }
static inline int normkit_mpi_max_error_string(void) { return MPI_MAX_ERROR_STRING; }
static inline void *normkit_mpi_in_place(void) { return MPI_IN_PLACE; }

#endif
