/*
 * config.h - kvtierd's one configuration table (Redis config.c style).
 *
 * Every option is one row of a table: name, type, bounds, default, whether SIGHUP may change
 * it at run time, and a one-line help. Sources apply in order, later ones winning: built-in
 * defaults, the config file (--config FILE: `name = value` lines, # comments; a value may be
 * in double quotes, and then holds any '#' and blanks up to its closing quote), KVTIER_<NAME>
 * environment variables, command-line flags (--name=value or --name value; dashes and
 * underscores are the same). Every value is checked against its row's bounds, then the
 * cross-option rules (kvt_config_validate); errors name the option, the value and the limit
 * (user text they quote shows control bytes as \xNN).
 * Strings may not hold control bytes (< 0x20, 0x7f) nor a '"' followed by blanks and '#', so
 * that kvt_config_print's output reloads as the same values.
 *
 * Ownership: a struct kvt_config is a plain value. The daemon keeps one live copy
 * (kvt_config_live); reloadable fields of it are updated with atomic stores on SIGHUP and read
 * with KVT_CFG() so readers on other threads never see a torn value.
 */
#ifndef KVT_CONFIG_H
#define KVT_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define KVT_CONFIG_STR_MAX 256

enum kvt_capacity_policy { KVT_POLICY_REJECT = 0, KVT_POLICY_DROP_COLDEST = 1 };

struct kvt_config {
	char socket_path[KVT_CONFIG_STR_MAX];
	char listen_tcp[KVT_CONFIG_STR_MAX];
	uint64_t insecure_loopback;
	uint64_t cq_threads;
	uint64_t workers;
	uint64_t max_message_bytes;
	uint64_t max_concurrent_calls;
	uint64_t reply_pool_buffers;
	uint64_t reply_pool_idle_ms;
	uint64_t host_capacity_bytes;
	uint64_t host_page_cache_bytes;
	uint64_t capacity_policy;
	uint64_t default_ttl_seconds;
	uint64_t max_ttl_seconds;
	uint64_t max_sessions;
	uint64_t max_append_bytes;
	uint64_t max_attend_items;
	uint64_t default_scheme;
	uint64_t default_key_bits;
	uint64_t default_value_bits;
	uint64_t default_group;
	uint64_t default_chunk_tokens;
	uint64_t default_n_sinks;
	uint64_t default_rotate_v;
	double default_pin_detect_ratio;
	uint64_t default_pin_detect_max;
	uint64_t default_recent_exact_tokens;
	uint64_t default_key_rounding;
	uint64_t log_level;
	uint64_t maintenance_interval_ms;
	uint64_t shutdown_grace_ms;
	uint64_t gpu_enable;
	uint64_t gpu_device;
	uint64_t gpu_arena_bytes;
	uint64_t gpu_staging_bytes;
	uint64_t gpu_ipc_idle_seconds;
	uint64_t gpu_default_tier; /* 0 host, 1 gpu */
	uint64_t gpu_restore_threads;
	uint64_t gpu_pin_host;
	uint64_t gpu_arena_policy; /* 0 lru, 1 keep */
};

/* Where the effective value of each option came from (for --print-config). */
enum kvt_config_source { KVT_SRC_DEFAULT, KVT_SRC_FILE, KVT_SRC_ENV, KVT_SRC_FLAG };

/* What the command line asked for besides options. */
struct kvt_cmdline {
	const char *config_file;
	int check_config;
	int print_config;
	int help;
	int version;
};

extern struct kvt_config kvt_config_live;
#define KVT_CFG(field) __atomic_load_n(&kvt_config_live.field, __ATOMIC_RELAXED)

/* Loads every source in order into cfg (sources may be NULL). argv options that are not in the
 * table and not one of --config/--check-config/--print-config/--help/--version are errors.
 * The argument after --config, -c or a `--name` of a non-bool option is its value, never a
 * flag, whatever it looks like. Returns 0, or -EINVAL with err naming the option, value and
 * limit. */
int kvt_config_load(struct kvt_config *cfg, int argc, char **argv, struct kvt_cmdline *cmd,
		    enum kvt_config_source *sources, char *err, size_t errlen);
/* Cross-option rules (defaults codec coherent, ttl <= max ttl, TCP only on loopback...). */
int kvt_config_validate(const struct kvt_config *cfg, char *err, size_t errlen);
void kvt_config_print(FILE *out, const struct kvt_config *cfg,
		      const enum kvt_config_source *sources);
void kvt_config_help(FILE *out);
/* Copies the reloadable options of next into kvt_config_live (atomic stores) and logs each
 * change; logs (and ignores) changed options that need a restart. Returns how many changed. */
int kvt_config_apply_reload(const struct kvt_config *next);

/* The socket path: the configured one, else $RUNTIME_DIRECTORY/kvtierd.sock, else
 * ./run/kvtierd.sock. */
void kvt_config_socket_path(const struct kvt_config *cfg, char *out, size_t len);

/* Parses "4GiB", "512M", "65536" (K/M/G/T, with or without iB/B, powers of 1024), or "25%"
 * (a share of this machine's physical memory). */
int kvt_parse_size(const char *s, uint64_t *out);

/* Number of rows and their names (tests iterate them). */
size_t kvt_config_n_options(void);
const char *kvt_config_option_name(size_t i);

#endif
