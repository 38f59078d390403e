//! `meshca request`: get a certificate from an Istio-compatible CA (meshca
//! or istiod), as istio-agent would.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use meshca_ca_store::dir::{self as cadir, OutFile};
use meshca_pki::csr::build_csr;
use meshca_pki::{KeyType, SigningKey, cert};
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

use crate::duration::parse_duration;
use crate::input::read_input;

#[derive(clap::Args)]
pub struct RequestArgs {
    /// The CA's address.
    #[arg(long, default_value = "127.0.0.1:15012")]
    pub addr: String,
    /// Root certificate that verifies the CA's serving certificate.
    #[arg(long)]
    pub root: PathBuf,
    /// Name to verify the CA's certificate against (istio-agent uses this one for localhost).
    #[arg(long, default_value = "istiod.istio-system.svc")]
    pub server_name: String,
    /// A bearer token file (a Kubernetes token, or one from `meshca token`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Authenticate with a client certificate chain and key instead (renewal).
    #[arg(long, requires = "client_key")]
    pub client_cert: Option<PathBuf>,
    #[arg(long)]
    pub client_key: Option<PathBuf>,
    #[arg(long, default_value = "rsa-2048")]
    pub key_type: KeyType,
    /// Requested lifetime; 0 asks for the CA's default.
    #[arg(long, value_parser = parse_duration, default_value = "0")]
    pub ttl: Duration,
    /// Value of the `clusterid` header.
    #[arg(long)]
    pub cluster_id: Option<String>,
    /// Write key.pem (0600), cert-chain.pem and root-cert.pem here instead of printing the chain.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn request(args: &RequestArgs) -> Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let key = SigningKey::generate(args.key_type)?;
        let csr = build_csr(&key, cert::EMPTY_NAME, &[]).map_err(anyhow::Error::msg)?;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read_input(&args.root)?))
            .domain_name(args.server_name.clone());
        if let (Some(cert_path), Some(key_path)) = (&args.client_cert, &args.client_key) {
            let key_pem = zeroize::Zeroizing::new(read_input(key_path)?);
            tls = tls.identity(Identity::from_pem(
                read_input(cert_path)?,
                key_pem.as_slice(),
            ));
        }
        let channel = Endpoint::from_shared(format!("https://{}", args.addr))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(10))
            .connect()
            .await
            .with_context(|| format!("connecting to {}", args.addr))?;
        let mut client = IstioCertificateServiceClient::new(channel);
        let mut request = tonic::Request::new(IstioCertificateRequest::from_agent(
            csr,
            i64::try_from(args.ttl.as_secs()).unwrap_or(i64::MAX),
            "",
        ));
        if let Some(path) = &args.token_file {
            let token = zeroize::Zeroizing::new(
                String::from_utf8(read_input(path)?).context("token is not UTF-8")?,
            );
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {}", token.trim()).parse()?);
        }
        if let Some(id) = &args.cluster_id {
            request.metadata_mut().insert("clusterid", id.parse()?);
        }
        let chain = match client.create_certificate(request).await {
            Ok(response) => response.into_inner().cert_chain,
            Err(status) => {
                let reason = status
                    .metadata()
                    .get("meshca-reason")
                    .and_then(|v| v.to_str().ok())
                    .map(|r| format!(" [{r}]"))
                    .unwrap_or_default();
                eprintln!("meshca: {:?}: {}{reason}", status.code(), status.message());
                return Ok(ExitCode::FAILURE);
            }
        };
        anyhow::ensure!(
            chain.len() >= 2,
            "the CA answered with {} chain element(s), expected at least 2",
            chain.len()
        );
        match &args.out {
            None => print!("{}", chain.concat()),
            Some(dir) => {
                let key_pem = key.to_pkcs8_pem()?;
                let certs = chain[..chain.len() - 1].concat();
                let root = &chain[chain.len() - 1];
                let written = cadir::write_all(
                    dir,
                    &[
                        OutFile {
                            name: "key.pem",
                            contents: key_pem.as_bytes(),
                            secret: true,
                        },
                        OutFile {
                            name: "cert-chain.pem",
                            contents: certs.as_bytes(),
                            secret: false,
                        },
                        OutFile {
                            name: "root-cert.pem",
                            contents: root.as_bytes(),
                            secret: false,
                        },
                    ],
                    true,
                )?;
                for path in written {
                    println!("wrote {}", path.display());
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
