# Thread control shared by the kernels: the OpenMP runtime when the build has it, one thread otherwise.
cdef int effective_threads() noexcept nogil
