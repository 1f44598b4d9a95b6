"""Reaching the API server: the pod's service account in a cluster, else the kubeconfig."""

from __future__ import annotations

from corevault.errors import UserError


def api_client(kubeconfig: str | None = None):  # -> kubernetes.client.ApiClient
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    if kubeconfig is None:
        try:
            config.load_incluster_config()
            return client.ApiClient()
        except ConfigException:
            pass
    try:
        config.load_kube_config(config_file=kubeconfig)
    except (ConfigException, OSError) as e:
        raise UserError(
            f"no in-cluster service account and no usable kubeconfig ({e}); "
            "run it in a pod with a ServiceAccount, or set KUBECONFIG (--kubeconfig for serve)"
        ) from None
    return client.ApiClient()


def core_api():  # -> kubernetes.client.CoreV1Api
    from kubernetes import client

    return client.CoreV1Api(api_client())
