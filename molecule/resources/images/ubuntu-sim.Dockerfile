# A fresh Ubuntu 22.04 host: systemd as PID 1, SSH, Python, and NO Docker, so the docker
# role's install path (Ubuntu's docker.io and docker-compose-v2) runs for real. Verda's
# own images ship Docker; this host stands for any Ubuntu machine that has none.
ARG BASE
FROM ${BASE}
ENV container=docker
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y \
      systemd systemd-sysv dbus python3 python3-apt sudo openssh-server \
      iproute2 iptables kmod ca-certificates e2fsprogs util-linux procps curl gnupg \
 && systemctl mask getty@tty1.service systemd-logind.service
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
