"""Reaching the API server: the pod's service account in a cluster, else the kubeconfig."""

from __future__ import annotations

from corevault.errors import UserError


def core_api():  # -> kubernetes.client.CoreV1Api
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        config.load_incluster_config()
    except ConfigException:
        try:
            config.load_kube_config()
        except (ConfigException, OSError) as e:
            raise UserError(f"no in-cluster service account and no usable kubeconfig ({e})") from None
    return client.CoreV1Api()
