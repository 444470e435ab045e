# A simulated Verda GPU host: systemd as PID 1, SSH, and Docker with the Compose v2
# plugin preinstalled and enabled, as Verda's images ship it, and apt's package lists
# kept as on a real host. No GPU and no NVIDIA driver.
ARG BASE
FROM ${BASE}
ENV container=docker
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y \
      systemd systemd-sysv dbus python3 python3-apt sudo openssh-server \
      docker.io docker-cli docker-compose iproute2 iptables kmod ca-certificates \
      e2fsprogs util-linux procps curl gnupg \
 && systemctl mask getty@tty1.service systemd-logind.service
STOPSIGNAL SIGRTMIN+3
CMD ["/lib/systemd/systemd"]
