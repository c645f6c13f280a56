-- A PHP-era schema with a foreign key from the delivery history into the queue, ON DELETE
-- RESTRICT (the PHP team's way to keep history): a queue row with history cannot be deleted.
CREATE TABLE sesiones_envio (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  nombre VARCHAR(150) NOT NULL,
  estado ENUM('activa','pausada','completada') NOT NULL DEFAULT 'activa'
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE cola_envios (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  sesion_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  mensaje TEXT NOT NULL,
  estado ENUM('pendiente','procesando','enviado','error') NOT NULL DEFAULT 'pendiente'
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

CREATE TABLE envios_whatsapp (
  id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
  cola_id INT NOT NULL,
  cliente_id INT NULL,
  telefono VARCHAR(20) NOT NULL,
  wamid VARCHAR(100) NULL,
  fecha_envio DATETIME NOT NULL,
  CONSTRAINT fk_envios_cola FOREIGN KEY (cola_id) REFERENCES cola_envios (id) ON DELETE RESTRICT
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4;

INSERT INTO sesiones_envio (id, nombre, estado) VALUES (40, 'sesion #40', 'completada');

INSERT INTO cola_envios (id, sesion_id, cliente_id, telefono, mensaje, estado) VALUES
  (1, 40, 701, '+51987400001', '{"type":"text","text":{"body":"hola"}}', 'enviado'),
  (2, 40, 702, '+51987400002', '{"type":"text","text":{"body":"hola"}}', 'enviado'),
  (3, 40, 703, '+51987400003', '{"type":"text","text":{"body":"hola"}}', 'enviado'),
  (4, 40, 704, '+51987400004', '{"type":"text","text":{"body":"hola"}}', 'error'),
  (5, 40, 705, '+51987400005', '{"type":"text","text":{"body":"hola"}}', 'error');

INSERT INTO envios_whatsapp (id, cola_id, cliente_id, telefono, wamid, fecha_envio) VALUES
  (1, 1, 701, '+51987400001', 'wamid.F1', '2024-05-01 10:00:00'),
  (2, 2, 702, '+51987400002', 'wamid.F2', '2024-05-01 10:00:00'),
  (3, 3, 703, '+51987400003', 'wamid.F3', '2024-05-01 10:00:00');
