# fastbn/_arrays.pxd -- the kernels' checks of the arrays they are handed, written once for every
# Cython module (the batch-norm kernels, the norms): the element type, and a buffer that is safe to
# read (or write) as n contiguous elements.  The Python layer (fastbn._checks) has already made
# the arrays so; these are the last line, so that a wrong call raises instead of reading wild.
cimport numpy as cnp


cdef inline int float_type(object a, int ndim, str name) except -1:
    """NPY_FLOAT or NPY_DOUBLE: the element type of ``a``, which must be a float32 or float64
    numpy array of ``ndim`` dimensions (any number when ndim < 0)."""
    if not cnp.PyArray_Check(a) or (ndim >= 0 and cnp.PyArray_NDIM(<cnp.ndarray>a) != ndim):
        what = f"{ndim}-D numpy array" if ndim >= 0 else "numpy array"
        raise TypeError(f"{name} must be a {what}, got {type(a).__name__} of shape {getattr(a, 'shape', None)}")
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t != cnp.NPY_FLOAT and t != cnp.NPY_DOUBLE:
        raise TypeError(f"{name} must be float32 or float64, got {a.dtype}")
    return t


cdef inline void *data(object a, int typenum, Py_ssize_t n, bint out, str name) except NULL:
    """The buffer of ``a``: an aligned, native-order, C-contiguous numpy array of ``n`` elements
    of ``typenum`` (writable if ``out``); anything else raises instead of becoming a wild pointer."""
    cdef cnp.ndarray arr
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy array, got {type(a).__name__}")
    arr = <cnp.ndarray>a
    if (cnp.PyArray_TYPE(arr) != typenum or cnp.PyArray_SIZE(arr) != n or not cnp.PyArray_ISNOTSWAPPED(arr)
            or not cnp.PyArray_CHKFLAGS(arr, cnp.NPY_ARRAY_CARRAY if out else cnp.NPY_ARRAY_CARRAY_RO)):
        want = ("float32" if typenum == cnp.NPY_FLOAT else "float64" if typenum == cnp.NPY_DOUBLE
                else "float16" if typenum == cnp.NPY_FLOAT16 else "bfloat16")
        raise ValueError(f"{name} must be an aligned, C-contiguous, native-order{', writable' if out else ''} "
                         f"{want} array of {n} elements, got {a.dtype} of shape {a.shape}")
    return cnp.PyArray_DATA(arr)
