// Command publish-usage-event publishes one llm_usage_recorded event the way a gateway should:
// idempotent producer, acks from all in-sync replicas, the tenant as the key, the charge as an
// exact decimal string.
//
// Against the local stack:
//
//	eval "$(llm-usage dev env)" && go run .
//
// Flags (each defaults to the environment variable named, then to the pipeline's default):
//
//	-brokers      KAFKA_BOOTSTRAP_SERVERS  localhost:9092
//	-topic        USAGE_TOPIC              llm_usage_recorded
//	-compression  zstd | lz4 | snappy | gzip | none   (zstd)
//	-tenant, -charge                       the event's tenant_id and customer_charge_usd
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"flag"
	"fmt"
	"math/big"
	"os"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// UsageEvent is the v1 payload. Money is a string: a float64 cannot hold 0.000432 exactly.
type UsageEvent struct {
	EventType           string  `json:"event_type"`
	SchemaVersion       int     `json:"schema_version"`
	GatewayRequestID    string  `json:"gateway_request_id"`
	TenantID            string  `json:"tenant_id"`
	DeploymentID        *string `json:"deployment_id"`
	UserID              *string `json:"user_id"`
	Provider            string  `json:"provider"`
	Model               string  `json:"model"`
	RequestKind         string  `json:"request_kind"`
	InputTokens         int64   `json:"input_tokens"`
	OutputTokens        int64   `json:"output_tokens"`
	UpstreamCostUSD     string  `json:"upstream_cost_usd"`
	CustomerChargeUSD   string  `json:"customer_charge_usd"`
	CustomerChargeCents int64   `json:"customer_charge_cents"`
	MarkupMode          string  `json:"markup_mode"`
	OccurredAt          string  `json:"occurred_at"`
}

func main() {
	brokers := flag.String("brokers", env("KAFKA_BOOTSTRAP_SERVERS", "localhost:9092"), "bootstrap servers, comma-separated")
	topic := flag.String("topic", env("USAGE_TOPIC", "llm_usage_recorded"), "the usage topic")
	compression := flag.String("compression", "zstd", "batch compression: zstd, lz4, snappy, gzip or none")
	tenant := flag.String("tenant", "acme", "tenant_id of the event")
	charge := flag.String("charge", "0.000432", "customer_charge_usd, an exact decimal")
	flag.Parse()

	codec, err := codecNamed(*compression)
	if err != nil {
		fail(err)
	}
	cents, err := roundHalfUpCents(*charge)
	if err != nil {
		fail(err)
	}

	client, err := kgo.NewClient(
		kgo.SeedBrokers(strings.Split(*brokers, ",")...),
		// Both are franz-go's defaults; spelled out because they are what makes a retry safe.
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.ProducerBatchCompression(codec),
		kgo.ProducerLinger(10*time.Millisecond),
		// Keep retrying through a leader change for two minutes before giving up.
		kgo.RecordDeliveryTimeout(2*time.Minute),
	)
	if err != nil {
		fail(fmt.Errorf("cannot create the Kafka client: %w", err))
	}
	defer client.Close()

	deployment, user := "support-bot", "user-42"
	event := UsageEvent{
		EventType:     "llm_usage_recorded",
		SchemaVersion: 1,
		// Create the id once per request and send the same one on every retry.
		GatewayRequestID:    "req-" + randomHex(16),
		TenantID:            *tenant,
		DeploymentID:        &deployment,
		UserID:              &user,
		Provider:            "openai",
		Model:               "gpt-4o-mini",
		RequestKind:         "chat.completions",
		InputTokens:         1200,
		OutputTokens:        300,
		UpstreamCostUSD:     "0.00036",
		CustomerChargeUSD:   *charge,
		CustomerChargeCents: cents,
		MarkupMode:          "flat_percent",
		OccurredAt:          time.Now().UTC().Format("2006-01-02T15:04:05.000Z07:00"),
	}
	value, err := json.Marshal(event)
	if err != nil {
		fail(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	record := &kgo.Record{Topic: *topic, Key: []byte(event.TenantID), Value: value}
	if err := client.ProduceSync(ctx, record).FirstErr(); err != nil {
		// Keep the event (outbox, spool) and publish it again later with the same id.
		fail(fmt.Errorf("publishing %s to %s at %s failed: %w", event.GatewayRequestID, *topic, *brokers, err))
	}
	fmt.Printf("published %s to %s partition %d offset %d (%s, charge %s USD)\n",
		event.GatewayRequestID, record.Topic, record.Partition, record.Offset, *compression, event.CustomerChargeUSD)
}

func codecNamed(name string) (kgo.CompressionCodec, error) {
	switch name {
	case "zstd":
		return kgo.ZstdCompression(), nil
	case "lz4":
		return kgo.Lz4Compression(), nil
	case "snappy":
		return kgo.SnappyCompression(), nil
	case "gzip":
		return kgo.GzipCompression(), nil
	case "none":
		return kgo.NoCompression(), nil
	}
	return kgo.CompressionCodec{}, fmt.Errorf("unknown compression %q: use zstd, lz4, snappy, gzip or none", name)
}

// roundHalfUpCents is the gateway's display rounding of an exact decimal, without floats.
func roundHalfUpCents(usd string) (int64, error) {
	amount, ok := new(big.Rat).SetString(usd)
	if !ok || amount.Sign() < 0 || strings.ContainsAny(usd, "eE/") {
		return 0, fmt.Errorf("-charge %q is not a plain non-negative decimal like 0.000432", usd)
	}
	cents := new(big.Rat).Mul(amount, big.NewRat(100, 1))
	cents.Add(cents, big.NewRat(1, 2))
	return new(big.Int).Quo(cents.Num(), cents.Denom()).Int64(), nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		fail(err)
	}
	return hex.EncodeToString(b)
}

func env(name, fallback string) string {
	if value := os.Getenv(name); value != "" {
		return value
	}
	return fallback
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "error:", err)
	os.Exit(1)
}
