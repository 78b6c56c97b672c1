/*
 * kvt_text.h - user text on its way to a terminal or a log, and numbers read from it: one
 * copy of the escaping for kvtierd's log (kvt_log_quote), its messages and kvtierctl's, so what
 * one tool shows as \xNN the others show the same way, and one strict decimal reader for the
 * numeric flags of kvtierctl and kvtier-bench.
 *
 * Every pointer is borrowed; output goes into the caller's buffer, which is always
 * NUL-terminated when len > 0. A short buffer cuts the text before an escape or a UTF-8
 * sequence, never inside one.
 */
#ifndef KVT_TEXT_H
#define KVT_TEXT_H

#include <stddef.h>
#include <stdint.h>

/* kvt_text_escape's flags */
#define KVT_TEXT_BACKSLASH 1u /* '"' and '\\' take a backslash: text shown inside quotes */

/* Writes s into buf with every byte a terminal acts on as \xNN: control bytes (< 0x20, 0x7f),
 * C1 controls in UTF-8 (0xc2 0x80..0x9f), Unicode's format characters and separators (Cf, Zl,
 * Zp: U+202E RIGHT-TO-LEFT OVERRIDE, U+200B..U+200F, U+2028, U+2066..U+2069, U+FEFF, ...; each
 * byte of the sequence) and bytes of no well-formed UTF-8 sequence; other well-formed UTF-8
 * passes as is. With KVT_TEXT_BACKSLASH, '"' and '\\' are written "\"" and
 * "\\" (so a typed "\x0a" reads apart from an escaped newline); without, they pass (a message
 * that quotes its own values). Returns buf. */
const char *kvt_text_escape(char *buf, size_t len, const char *s, unsigned flags);

/* kvt_text_escape of at most the first n bytes of s (up to its NUL); a UTF-8 sequence that
 * would reach past them is left out whole. */
const char *kvt_text_escape_n(char *buf, size_t len, const char *s, size_t n, unsigned flags);

/* s as one value of a message or a logfmt line: as it is when it is not empty and holds no
 * space, '=', '"', '\\' nor a byte kvt_text_escape escapes; else in double quotes, escaped with
 * KVT_TEXT_BACKSLASH. A quoted value is always closed (len >= 3; below that buf is ""). Returns
 * buf. */
const char *kvt_text_quote(char *buf, size_t len, const char *s);

/* [s, end) as a decimal number <= max into *out: digits only, at least one, no overflow.
 * strtoul and atoi took a sign ("-1" was 2^64 - 1), blanks, "0x10" (base 0) and trailing
 * junk ("12x" was 12). Returns 0 or -EINVAL (*out untouched); the caller names the flag and
 * the limit. */
int kvt_text_parse_dec(const char *s, const char *end, uint64_t max, uint64_t *out);

#endif
