#!/bin/sh
# trainwarden node preflight for Slurm: the Prolog, the Epilog and the HealthCheckProgram all
# run this one script on the node (see docs/PREFLIGHT.md).
#
#   slurm.conf:  Prolog=/etc/slurm/trainwarden-preflight.sh
#                Epilog=/etc/slurm/trainwarden-preflight.sh
#                HealthCheckProgram=/etc/slurm/trainwarden-preflight.sh
#                HealthCheckInterval=300
#
# On failure the node is drained by trainwarden itself (`--drain`: `scontrol update ... State=DRAIN
# Reason="trainwarden: preflight <check>: <why>"`, argv only, the reason sanitised) and the script
# exits non-zero, so in a Prolog the job does not start here. Slurm's own prolog-failure drain
# finds the node drained already and keeps trainwarden's reason.
#
# Settings come from one admin-owned file (default /etc/trainwarden/preflight.env), e.g.
#   TRAINWARDEN_BIN=/opt/trainwarden/bin/trainwarden
#   TRAINWARDEN_CONFIG=/etc/trainwarden/config.toml
#   TRAINWARDEN_PREFLIGHT_ARGS="--expect-gpus 8 --checkpoint-dir /scratch/ckpt --timeout 20"
set -u
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
TRAINWARDEN_ENV=${TRAINWARDEN_ENV:-/etc/trainwarden/preflight.env}
if [ -r "$TRAINWARDEN_ENV" ]; then
    . "$TRAINWARDEN_ENV"
fi
TRAINWARDEN_CONFIG=${TRAINWARDEN_CONFIG:-/etc/trainwarden/config.toml}
node=${SLURMD_NODENAME:-$(hostname -s)}
set -- preflight --drain --node "$node"
if [ -r "$TRAINWARDEN_CONFIG" ]; then
    set -- "$@" --config "$TRAINWARDEN_CONFIG"
fi
# As the Epilog: the run is journaled as the end of the job that just left the node.
if [ "${SLURM_SCRIPT_CONTEXT:-}" = epilog_slurmd ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    set -- "$@" --after-job "$SLURM_JOB_ID"
fi
# Word-split on purpose: TRAINWARDEN_PREFLIGHT_ARGS is the admin's own flag list.
# shellcheck disable=SC2086
exec "${TRAINWARDEN_BIN:-trainwarden}" "$@" ${TRAINWARDEN_PREFLIGHT_ARGS:-}
