// The MPI tests arrive with the distribution work (issue 11); this file keeps the target buildable.
