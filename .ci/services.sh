#!/usr/bin/env bash
# Start the brokers the Celery integration tests and benchmark use, if they are not answering:
#   Redis    on 127.0.0.1:6379 (results for every test; broker for the redis cases)
#   RabbitMQ on 127.0.0.1:5672 (guest/guest; broker for the amqp cases)
# Idempotent: a service that already answers is left alone.  Exits non-zero if a service does not
# answer within its bounded wait, so CI fails loudly instead of skipping.
set -euo pipefail

REDIS_WAIT=${REDIS_WAIT:-20}        # seconds
RABBITMQ_WAIT=${RABBITMQ_WAIT:-120} # seconds; a cold RabbitMQ boot takes 5-30 s

log() { echo "services.sh: $*" >&2; }

redis_up() { redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null | grep -q PONG; }

port_open() { # host port
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

wait_for() { # seconds description command...
    local seconds=$1 what=$2; shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        if ((SECONDS >= deadline)); then
            log "$what did not answer within ${seconds}s"
            return 1
        fi
        sleep 0.5
    done
}

start_redis() {
    if redis_up; then
        log "redis already answering on 127.0.0.1:6379"
        return 0
    fi
    log "starting redis-server"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for "$REDIS_WAIT" redis redis_up
    log "redis up"
}

rabbitmq_up() { port_open 127.0.0.1 5672; }

start_rabbitmq() {
    if rabbitmq_up; then
        log "rabbitmq already answering on 127.0.0.1:5672"
        return 0
    fi
    log "starting rabbitmq-server -detached"
    rabbitmq-server -detached
    # await_startup knows when the broker (not just the Erlang VM) is ready; bound it, and fall
    # back to polling the AMQP port in case rabbitmqctl cannot reach the node yet.
    if command -v rabbitmqctl >/dev/null &&
        timeout "$RABBITMQ_WAIT" rabbitmqctl await_startup --timeout "$RABBITMQ_WAIT" >/dev/null 2>&1; then
        :
    fi
    wait_for "$RABBITMQ_WAIT" rabbitmq rabbitmq_up
    log "rabbitmq up"
}

start_redis
start_rabbitmq
