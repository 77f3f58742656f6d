import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.Locale;
import java.util.Properties;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentLinkedQueue;
import org.apache.kafka.clients.producer.KafkaProducer;
import org.apache.kafka.clients.producer.ProducerConfig;
import org.apache.kafka.clients.producer.ProducerRecord;
import org.apache.kafka.common.header.internals.RecordHeader;
import org.apache.kafka.common.header.internals.RecordHeaders;
import org.apache.kafka.common.serialization.ByteArraySerializer;

/**
 * Publishes usage events with the Kafka Java client, as a Java gateway would: idempotent,
 * acks=all, batched and compressed, with headers, optionally inside transactions.
 *
 * <pre>
 * java -cp '&lt;kafka libs&gt;/*' UsageProducer.java BOOTSTRAP TOPIC COMPRESSION SCRIPT [TRANSACTIONAL_ID]
 * </pre>
 *
 * SCRIPT has one command a line, fields separated by a tab:
 *
 * <ul>
 *   <li>{@code record KEY PARTITION JSON}: send JSON as the value; KEY {@code \N} is a null key,
 *       PARTITION {@code -} lets the client's partitioner choose;
 *   <li>{@code begin}, {@code commit}, {@code abort}: transaction control (with TRANSACTIONAL_ID).
 *       Before an abort the records are flushed, so that the broker holds them and must hide them.
 * </ul>
 *
 * Prints one summary line, with the client's compression rate and records per request; exits 1
 * if any record was not acknowledged.
 */
public final class UsageProducer {
  public static void main(String[] args) throws Exception {
    if (args.length < 4 || args.length > 5) {
      System.err.println(
          "usage: UsageProducer BOOTSTRAP TOPIC COMPRESSION SCRIPT [TRANSACTIONAL_ID]");
      System.exit(2);
    }
    String topic = args[1];
    boolean transactional = args.length == 5;
    Properties config = new Properties();
    config.put(ProducerConfig.BOOTSTRAP_SERVERS_CONFIG, args[0]);
    config.put(ProducerConfig.ENABLE_IDEMPOTENCE_CONFIG, "true");
    config.put(ProducerConfig.ACKS_CONFIG, "all");
    config.put(ProducerConfig.COMPRESSION_TYPE_CONFIG, args[2]);
    config.put(ProducerConfig.LINGER_MS_CONFIG, "20");
    config.put(ProducerConfig.DELIVERY_TIMEOUT_MS_CONFIG, "120000");
    config.put(ProducerConfig.KEY_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    config.put(ProducerConfig.VALUE_SERIALIZER_CLASS_CONFIG, ByteArraySerializer.class.getName());
    if (transactional) {
      config.put(ProducerConfig.TRANSACTIONAL_ID_CONFIG, args[4]);
    }

    List<String> script = Files.readAllLines(Path.of(args[3]), StandardCharsets.UTF_8);
    ConcurrentLinkedQueue<String> failures = new ConcurrentLinkedQueue<>();
    TreeSet<Integer> partitions = new TreeSet<>();
    int sent = 0;
    int committed = 0;
    int aborted = 0;
    try (KafkaProducer<byte[], byte[]> producer = new KafkaProducer<>(config)) {
      if (transactional) {
        producer.initTransactions();
      }
      for (String line : script) {
        String[] fields = line.split("\t", 4);
        switch (fields[0]) {
          case "begin" -> producer.beginTransaction();
          case "commit" -> {
            producer.commitTransaction();
            committed++;
          }
          case "abort" -> {
            producer.flush();
            producer.abortTransaction();
            aborted++;
          }
          case "record" -> {
            byte[] key = fields[1].equals("\\N") ? null : fields[1].getBytes(StandardCharsets.UTF_8);
            Integer partition = fields[2].equals("-") ? null : Integer.valueOf(fields[2]);
            RecordHeaders headers = new RecordHeaders();
            headers.add(new RecordHeader("source", "java-interop".getBytes(StandardCharsets.UTF_8)));
            headers.add(new RecordHeader("content-type", "application/json".getBytes(StandardCharsets.UTF_8)));
            headers.add(new RecordHeader("trace-id", (byte[]) null));
            byte[] value = fields[3].getBytes(StandardCharsets.UTF_8);
            producer.send(
                new ProducerRecord<>(topic, partition, key, value, headers),
                (metadata, error) -> {
                  if (error != null) {
                    failures.add(error.toString());
                  } else {
                    synchronized (partitions) {
                      partitions.add(metadata.partition());
                    }
                  }
                });
            sent++;
          }
          default -> throw new IllegalArgumentException("unknown script command: " + fields[0]);
        }
      }
      producer.flush();
      if (!failures.isEmpty()) {
        System.err.println("not acknowledged: " + failures.size() + ", first: " + failures.peek());
        System.exit(1);
      }
      System.out.printf(
          Locale.ROOT,
          "sent %d records to partitions %s (%d transactions committed, %d aborted); "
              + "compression-rate-avg %.3f, records-per-request-avg %.1f%n",
          sent, partitions, committed, aborted,
          metric(producer, "compression-rate-avg"), metric(producer, "records-per-request-avg"));
    }
  }

  /** One of the client's own producer metrics (averages over its recent batches). */
  private static double metric(KafkaProducer<?, ?> producer, String name) {
    for (var entry : producer.metrics().entrySet()) {
      if (entry.getKey().group().equals("producer-metrics") && entry.getKey().name().equals(name)) {
        return ((Number) entry.getValue().metricValue()).doubleValue();
      }
    }
    return Double.NaN;
  }
}
