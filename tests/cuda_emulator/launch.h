/* Launching an emulated kernel from Python (ctypes).
 *
 * Included after the kernel source.  For each kernel instantiation that the RawModule was asked
 * for, EMU_KERNEL(name, suffix, template arguments...) exports two C functions (suffix f32, f64 or
 * f16 for float, double or __half, then _N for a second template argument N):
 *
 *   const char *emu_sig_<name>_<suffix>()   the kernel's parameter types, one code per
 *                                           parameter, each followed by a comma: i (int),
 *                                           q (long long), f (float), d (double), e (__half,
 *                                           pointers only), and P + code
 *                                           for a pointer ("Pf,Pf,d,q,")
 *   int emu_launch_<name>_<suffix>(gx, gy, bx, by, void **args)
 *                                           runs the kernel on a (gx, gy) grid of (bx, by)
 *                                           blocks; args[i] points at the value of parameter
 *                                           i, as in cuLaunchKernel.  Returns 0, or 1 when a
 *                                           block deadlocked.
 *
 * The Python side (cupy/_raw.py) checks each argument against the signature before it launches. */
#ifndef FBN_EMU_LAUNCH_H
#define FBN_EMU_LAUNCH_H

#include <cstddef>
#include <string>
#include <type_traits>
#include <utility>

/* Runs body(arg) once per CUDA thread of every block of the grid, block after block (scheduler.cpp).
 * Returns 0, or 1 as soon as a block deadlocks: some of its threads wait at a barrier that the
 * others have finished without reaching. */
int emu_run_grid(void (*body)(void *), void *arg, unsigned gx, unsigned gy, unsigned bx, unsigned by);

template <typename A> struct emu_code {
    static std::string s() { return "?"; }
};
template <> struct emu_code<int> {
    static std::string s() { return "i"; }
};
template <> struct emu_code<long long> {
    static std::string s() { return "q"; }
};
template <> struct emu_code<float> {
    static std::string s() { return "f"; }
};
template <> struct emu_code<double> {
    static std::string s() { return "d"; }
};
template <> struct emu_code<__half> {
    static std::string s() { return "e"; }
};
template <typename E> struct emu_code<E *> {
    static std::string s() { return "P" + emu_code<std::remove_const_t<E>>::s(); }
};

template <typename... A> const char *emu_signature(void (*)(A...))
{
    static std::string s = (std::string() + ... + (emu_code<A>::s() + ","));
    return s.c_str();
}

template <typename... A> struct emu_launch_args {
    void (*f)(A...);
    void **p;
};

template <typename... A, std::size_t... I>
void emu_call(void (*f)(A...), void **p, std::index_sequence<I...>)
{
    f(*static_cast<std::remove_reference_t<A> *>(p[I])...);
}

template <typename... A> void emu_invoke(void *a)
{
    auto *la = static_cast<emu_launch_args<A...> *>(a);
    emu_call(la->f, la->p, std::index_sequence_for<A...>{});
}

template <typename... A>
int emu_launch(void (*f)(A...), unsigned gx, unsigned gy, unsigned bx, unsigned by, void **p)
{
    emu_launch_args<A...> la{f, p};
    return emu_run_grid(&emu_invoke<A...>, &la, gx, gy, bx, by);
}

/* The library is built with -fvisibility=hidden: only these entry points are exported, so that
 * two emulated modules loaded into one process never share the scheduler's globals. */
#define EMU_EXPORT extern "C" __attribute__((visibility("default")))
#define EMU_KERNEL(name, suffix, ...)                                                                 \
    EMU_EXPORT const char *emu_sig_##name##_##suffix() { return emu_signature(&name<__VA_ARGS__>); } \
    EMU_EXPORT int emu_launch_##name##_##suffix(unsigned gx, unsigned gy, unsigned bx, unsigned by, \
                                                void **p)                                          \
    {                                                                                                 \
        return emu_launch(&name<__VA_ARGS__>, gx, gy, bx, by, p);                                     \
    }

#endif
