/*
 * kvt_tsan.h - happens-before annotations for ThreadSanitizer builds (KVTIER_SANITIZE=thread).
 *
 * Why: gRPC core is not built with TSan, so the ordering it guarantees is invisible to it: a
 * buffer filled on a worker and freed by gRPC's slice destructor on one of gRPC's threads, or a
 * call whose batch a worker started and whose completion cq_main handles, looks like a race.
 * Each hand-over to gRPC releases the object and each hand-back acquires it, which is exactly
 * the ordering gRPC gives. Outside TSan builds these are empty.
 */
#ifndef KVT_TSAN_H
#define KVT_TSAN_H

#if defined(__SANITIZE_THREAD__)
#define KVT_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KVT_TSAN 1
#endif
#endif

#ifdef KVT_TSAN
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define KVT_TSAN_RELEASE(p) __tsan_release((void *)(p))
#define KVT_TSAN_ACQUIRE(p) __tsan_acquire((void *)(p))
#else
#define KVT_TSAN_RELEASE(p) ((void)(p))
#define KVT_TSAN_ACQUIRE(p) ((void)(p))
#endif

#endif
