# A simulated comfyume app server: systemd, Debian's redis-server, git (the tests serve
# ComfyUI's stand-in from it as a git repository). The password is
# set by the scenario's prepare step, never baked into the image.
ARG BASE
FROM ${BASE}
ENV container=docker
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y \
      systemd systemd-sysv dbus python3 sudo redis-server iproute2 procps git ufw curl \
 && rm -rf /var/lib/apt/lists/*
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
