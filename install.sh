#!/bin/sh
# Install streamd as a systemd service.  As root, from a checkout:
#
#   sh install.sh
#
# What goes where (nothing else is touched; running it again upgrades the code
# and keeps your config, keys and environment file):
#
#   /opt/streamd/             streamd.py, backends/, demo.html, README.md, LICENSE   root 0755/0644
#   /etc/streamd/config.yaml  from config.example.yaml, if there is none           streamd:root 0400
#                             (only the service's user reads it: not Apache's group)
#   /etc/streamd/keys/        API keys, one file per backend (openai, anthropic,   root 0700
#                             gemini, langgraph): systemd hands them to the service
#                             as credentials (LoadCredential=), never in the config
#   /etc/streamd/env          KEY=value lines for the service (EnvironmentFile=)    root 0600
#   /etc/systemd/system/      streamd.service, streamd.socket                       root 0644
#
# and the system user `streamd` (group www-data, no home, no shell), if missing.
#
# Python packages are not installed here: for Debian 12,
#   apt install python3-yaml python3-prometheus-client python3-urllib3 python3-h2
#
# Environment: DESTDIR=/some/dir installs under that directory instead of /
# (for packaging and the test suite; the user must exist then, and systemd is
# not told).  STREAMD_USER and STREAMD_GROUP change the user (default streamd)
# and the group it shares with Apache (default www-data).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
dest=${DESTDIR:-}
user=${STREAMD_USER:-streamd}
group=${STREAMD_GROUP:-www-data}

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run it as root (it creates a user and root-owned files)" >&2
    exit 1
fi
if ! getent group "$group" >/dev/null; then
    echo "install.sh: group $group does not exist (Apache's group: set STREAMD_GROUP)" >&2
    exit 1
fi
if ! id -u "$user" >/dev/null 2>&1; then
    if [ -n "$dest" ]; then
        echo "install.sh: user $user does not exist (with DESTDIR it is not created)" >&2
        exit 1
    fi
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
        --gid "$group" --comment "streamd SSE daemon" "$user"
fi

opt=$dest/opt/streamd
etc=$dest/etc/streamd
units=$dest/etc/systemd/system

# The code: root's, readable by all (it holds no secrets).
install -d -o root -g root -m 0755 "$opt" "$opt/backends"
install -o root -g root -m 0644 "$here/streamd.py" "$here/demo.html" "$here/README.md" "$here/LICENSE" "$opt/"
install -o root -g root -m 0644 "$here"/backends/*.py "$opt/backends/"
rm -rf "$opt/backends/__pycache__"

# The config: the service's user reads it; nobody else (ProtectSystem=strict
# keeps /etc read-only for the service, so it cannot change it either).
install -d -o root -g root -m 0755 "$etc"
if [ ! -e "$etc/config.yaml" ]; then
    install -o "$user" -g root -m 0400 "$here/config.example.yaml" "$etc/config.yaml"
fi
# Keys: root's alone; systemd copies them for the service (LoadCredential=keys:...).
install -d -o root -g root -m 0700 "$etc/keys"
if [ ! -e "$etc/env" ]; then
    (umask 077 && printf '%s\n' "# KEY=value lines for streamd.service (EnvironmentFile=), root only." \
        "# Prefer /etc/streamd/keys/<backend> for API keys." > "$etc/env")
fi
chown root:root "$etc/env"
chmod 0600 "$etc/env"

install -d -m 0755 "$units"
install -o root -g root -m 0644 "$here/streamd.service" "$here/streamd.socket" "$units/"

if [ -z "$dest" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
cat <<EOF
streamd installed in $opt.  Next:
  put API keys in $etc/keys/<backend> (e.g. openai; one line, root only)
  edit $etc/config.yaml, then check it as the service will read it:
    runuser -u $user -- python3 /opt/streamd/streamd.py check --config /etc/streamd/config.yaml
  systemctl enable --now streamd.socket streamd.service
EOF
