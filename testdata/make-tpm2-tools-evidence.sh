#!/usr/bin/env bash
# make-tpm2-tools-evidence.sh records real attestation evidence made by
# tpm2-tools against a throw-away swtpm, for attest/tpm2tools_test.go and
# cmd/coffrectl/testdata/verify-quote.txtar.
#
# Usage: testdata/make-tpm2-tools-evidence.sh [OUTDIR]   (default: testdata/tpm2-tools)
#
# Needs swtpm, swtpm_setup, swtpm_localca (packages swtpm, swtpm-tools),
# tpm2-tools with the swtpm TCTI (libtss2-tcti-swtpm0), openssl and xxd or od.
# Everything it makes lives in a temporary directory that is removed at the
# end: the TPM state, a local EK CA made just for this run, and the swtpm it
# starts (stopped by its own pid). It never touches /var/lib/swtpm-localca.
#
# The output is regenerated from scratch each time: keys, certificates,
# clock and signatures differ between runs (the nonce and the PCR values do
# not), so re-running means re-committing every file together (the tests
# read them as one set).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/tpm2-tools}
mkdir -p "$out"
out=$(cd "$out" && pwd)

work=$(mktemp -d "${TMPDIR:-/tmp}/coffre-tpm2-tools.XXXXXX")
swtpm_pid=
cleanup() {
	if [ -n "$swtpm_pid" ]; then
		kill "$swtpm_pid" 2>/dev/null || true
		wait "$swtpm_pid" 2>/dev/null || true
	fi
	rm -rf "$work"
}
trap cleanup EXIT

log() { printf '+ %s\n' "$*" >&2; }
run() { log "$@"; "$@"; }

# --- a local EK CA and a TPM state with an EK certificate --------------------
mkdir -p "$work/state" "$work/ca" "$work/ekcerts"
cat >"$work/swtpm_setup.conf" <<EOF
create_certs_tool = /usr/bin/swtpm_localca
create_certs_tool_config = $work/swtpm-localca.conf
create_certs_tool_options = $work/swtpm-localca.options
active_pcr_banks = sha256
EOF
cat >"$work/swtpm-localca.conf" <<EOF
statedir = $work/ca
signingkey = $work/ca/signkey.pem
issuercert = $work/ca/issuercert.pem
certserial = $work/ca/certserial
EOF
cat >"$work/swtpm-localca.options" <<EOF
--platform-manufacturer Coffre
--platform-version 1.0
--platform-model tpm2-tools-evidence
EOF

# --pcr-banks sha1,sha256: the quote uses SHA-256 only; the SHA-1 bank is
# active so that a multi-bank tpm2_pcrread file can be recorded for the
# parser's refusal test.
run swtpm_setup --tpm2 --tpmstate "$work/state" --config "$work/swtpm_setup.conf" \
	--create-ek-cert --pcr-banks sha1,sha256 --write-ek-cert-files "$work/ekcerts" \
	--logfile "$work/swtpm_setup.log"

# --- start swtpm on a free loopback port pair ---------------------------------
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
port=
for _ in $(seq 1 50); do
	p=$((20000 + RANDOM % 20000))
	if port_free "$p" && port_free $((p + 1)); then
		port=$p
		break
	fi
done
[ -n "$port" ] || { echo "no free port pair found" >&2; exit 1; }

log swtpm socket --tpm2 --tpmstate "dir=$work/state" \
	--server "type=tcp,port=$port,bindaddr=127.0.0.1" \
	--ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" --flags not-need-init
swtpm socket --tpm2 --tpmstate "dir=$work/state" \
	--server "type=tcp,port=$port,bindaddr=127.0.0.1" \
	--ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
	--flags not-need-init --log "file=$work/swtpm.log" &
swtpm_pid=$!
for _ in $(seq 1 100); do
	port_free "$port" || break
	sleep 0.05
done

export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$port"
log "TPM2TOOLS_TCTI=$TPM2TOOLS_TCTI"
cd "$work"

# swtpm has no resource manager: every transient object and session a tool
# leaves behind is flushed before the next one runs.
flush() { tpm2_flushcontext -t && tpm2_flushcontext -l && tpm2_flushcontext -s; }

run tpm2_startup -c

# --- EK, AKs ------------------------------------------------------------------
run tpm2_createek -c ek.ctx -G rsa -u ek.pub
flush
run tpm2_createak -C ek.ctx -c ak.ctx -G rsa -g sha256 -s rsassa -u ak.pub -n ak.name -f tss
flush
run tpm2_readpublic -c ak.ctx -f pem -o ak.pem
flush
run tpm2_createak -C ek.ctx -c ak-ecc.ctx -G ecc -g sha256 -s ecdsa -u ak-ecc.pub -n ak-ecc.name -f tss
flush
run tpm2_readpublic -c ak-ecc.ctx -f pem -o ak-ecc.pem
flush

# --- PCRs 7 and 16 get non-zero values ----------------------------------------
run tpm2_pcrextend \
	7:sha256=$(printf 'coffre secure boot state' | openssl dgst -sha256 -r | cut -d' ' -f1) \
	16:sha256=$(printf 'coffre debug pcr' | openssl dgst -sha256 -r | cut -d' ' -f1)
# tpm2_pcrread -o writes bare values unless told -F serialized (tpm2_quote
# -o defaults to serialized); both are recorded, the bare one for the
# parser's refusal test.
run tpm2_pcrread sha256:0,7,16 -F serialized -o pcrread-sha256.pcrs
run tpm2_pcrread sha256:0,7,16 -o pcrread-sha256.values
# All 24 SHA-256 PCRs: more than the 8 digests one TPM2_PCR_Read returns, so
# the file holds several TPML_DIGEST blocks.
run tpm2_pcrread sha256:all -F serialized -o pcrread-sha256-all.pcrs
run tpm2_pcrread sha1:0,7+sha256:0,7 -F serialized -o pcrread-sha1-sha256.pcrs

# --- quotes -------------------------------------------------------------------
# A fixed nonce, so that golden files (cmd/coffrectl/testdata/verify-quote.txtar)
# survive a re-recording; freshness is the verifier's business, not this data's.
nonce=$(printf 'coffre tpm2-tools evidence nonce' | openssl dgst -sha256 -r | cut -d' ' -f1)
printf '%s\n' "$nonce" >nonce.hex
run tpm2_quote -c ak.ctx -l sha256:0,7,16 -q "$nonce" -m quote.msg -s quote.sig -o quote.pcrs -g sha256
flush
# The same quote request with a "plain" signature (raw RSASSA signature
# bytes), for the plain-format path.
run tpm2_quote -c ak.ctx -l sha256:0,7,16 -q "$nonce" -m quote-plain.msg -s quote-plain.sig -f plain -o quote-plain.pcrs -g sha256
flush
run tpm2_quote -c ak-ecc.ctx -l sha256:0,7,16 -q "$nonce" -m quote-ecc.msg -s quote-ecc.sig -o quote-ecc.pcrs -g sha256
flush
run tpm2_quote -c ak-ecc.ctx -l sha256:0,7,16 -q "$nonce" -m quote-ecc-plain.msg -s quote-ecc-plain.sig -f plain -o quote-ecc-plain.pcrs -g sha256
flush

# --- EK certificate and the CA that issued it ---------------------------------
run tpm2_nvread 0x01c00002 -o ek-cert.der
# The NV index may hold trailing padding; keep exactly the DER certificate.
openssl x509 -inform DER -in ek-cert.der -outform DER -out ek-cert.der
cp "$work/ca/swtpm-localca-rootca-cert.pem" ca-root.pem
cp "$work/ca/issuercert.pem" ca-intermediate.pem
cat ca-root.pem ca-intermediate.pem >ca-bundle.pem

# --- a second, unrelated local CA for the "another CA" test -------------------
mkdir -p "$work/other"
cat >"$work/other/swtpm-localca.conf" <<EOF
statedir = $work/other/ca
signingkey = $work/other/ca/signkey.pem
issuercert = $work/other/ca/issuercert.pem
certserial = $work/other/ca/certserial
EOF
sed "s|$work/swtpm-localca.conf|$work/other/swtpm-localca.conf|" "$work/swtpm_setup.conf" >"$work/other/swtpm_setup.conf"
mkdir -p "$work/other/state" "$work/other/ca"
run swtpm_setup --tpm2 --tpmstate "$work/other/state" --config "$work/other/swtpm_setup.conf" \
	--create-ek-cert --pcr-banks sha256 --logfile "$work/other/swtpm_setup.log"
cp "$work/other/ca/swtpm-localca-rootca-cert.pem" other-ca-root.pem
cp "$work/other/ca/issuercert.pem" other-ca-intermediate.pem
cat other-ca-root.pem other-ca-intermediate.pem >other-ca-bundle.pem

# --- versions -----------------------------------------------------------------
{
	tpm2_quote --version
	swtpm --version
	swtpm_setup --version || true # exits 1 after printing its version (swtpm 0.7.1)
	openssl version
	if command -v dpkg-query >/dev/null; then
		dpkg-query -W -f '${Package} ${Version}\n' tpm2-tools swtpm swtpm-tools libtpms0 libtss2-tcti-swtpm0 2>/dev/null || true
	fi
} >versions.txt

# --- copy the evidence out ----------------------------------------------------
files=(ek.pub ak.pub ak.name ak.pem ak-ecc.pub ak-ecc.name ak-ecc.pem
	nonce.hex quote.msg quote.sig quote.pcrs
	quote-plain.msg quote-plain.sig quote-plain.pcrs
	quote-ecc.msg quote-ecc.sig quote-ecc.pcrs
	quote-ecc-plain.msg quote-ecc-plain.sig quote-ecc-plain.pcrs
	pcrread-sha256.pcrs pcrread-sha256.values pcrread-sha256-all.pcrs pcrread-sha1-sha256.pcrs
	ek-cert.der ca-root.pem ca-intermediate.pem ca-bundle.pem
	other-ca-root.pem other-ca-intermediate.pem other-ca-bundle.pem versions.txt)
for f in "${files[@]}"; do
	cp "$f" "$out/$f"
	chmod 0644 "$out/$f" # tpm2-tools creates its outputs 0640
done
log "wrote ${#files[@]} files to $out"
