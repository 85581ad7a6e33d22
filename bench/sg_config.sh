# Sourced by bench/load.sh and bench/scaling.sh: writes a sessiongate config
# for a benchmark target.
#
# write_sg_config FILE PORT ADMIN_PORT ADMIN_TOKEN ORIGIN_PORT DATABASE_URL \
#                 REDIS_URL LOCAL_CACHE_MS REDIS_PREFIX AUTH ROOT
#
# One worker thread, log level warn, one route `/` to the origin with AUTH.
# REDIS_URL empty means the in-process tier; a comma-separated list of URLs
# means a Redis Cluster (store.redis_cluster_urls, the seed nodes). Unless
# AUTH is "none" or ROOT is empty, the [[policies]] are gateway.toml's own
# (ROOT's), with absolute plugin paths.
write_sg_config() {
    local file="$1" port="$2" admin_port="$3" admin_token="$4" origin_port="$5"
    local db="$6" redis="$7" cache_ms="$8" prefix="$9" auth="${10}" root="${11}"
    {
        cat <<CONF
# Written by bench/$(basename "$0").
[server]
listen = "127.0.0.1:$port"
worker_threads = 1

[admin]
listen = "127.0.0.1:$admin_port"
token = "$admin_token"

[store]
database_url = "$db"
CONF
        if [[ "$redis" == *,* ]]; then
            # A comma-separated list: the seed nodes of a Redis Cluster.
            printf 'redis_cluster_urls = [%s]\nlocal_cache_ttl_ms = %s\nredis_prefix = "%s"\n' \
                "$(sed 's/[^,]*/"&"/g; s/,/, /g' <<<"$redis")" "$cache_ms" "$prefix"
        elif [[ -n "$redis" ]]; then
            printf 'redis_url = "%s"\nlocal_cache_ttl_ms = %s\nredis_prefix = "%s"\n' \
                "$redis" "$cache_ms" "$prefix"
        fi
        cat <<CONF

[session]
cookie_secure = false

[log]
level = "warn"

[[upstreams]]
name = "origin"
urls = ["http://127.0.0.1:$origin_port"]

[[routes]]
prefix = "/"
upstream = "origin"
auth = "$auth"

CONF
        if [[ "$auth" != none && -n "$root" ]]; then
            awk '/^\[\[policies\]\]/ { p = 1 } /^\[/ && !/^\[\[policies\]\]/ { p = 0 } p' \
                "$root/gateway.toml" | sed "s#^plugin = \"plugins/#plugin = \"$root/plugins/#"
        fi
    } >"$file"
    if [[ "$auth" != none && -n "$root" ]] && ! grep -q '^\[\[policies\]\]' "$file"; then
        echo "no [[policies]] found in $root/gateway.toml" >&2
        return 1
    fi
}
